"""The GPU plan's host cost per call, measured where there is no GPU.

A convolution on CUDA tensors runs the same C++ as on the CPU up to the
kernels: argument checks, the memory-format decision, the path and its plan
(Note [Device policy] in csrc/plan.h), the GEMM engine's calls. Only the test
extension can run that plan on CPU tensors (tests/emulated/gpu_plan.cpp,
torch.ops.convt_ext_emulated), so this script times its ops on tiny tensors,
with the aten engine pinned, next to convt_ext's own CPU calls. The kernels
do almost nothing there, so each figure is host work: an upper bound of what a
GPU call adds before its kernels run (each includes one torch.ops call from
Python, some 4 us, which the library's own functions avoid).

    python benchmarks/gpu_plan_overhead.py            # from the repository root

Goals: at most 15 us a forward call and 40 us a forward+backward.
"""
from __future__ import annotations

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
try:
    import convt_ext  # the installed package
except ImportError:  # a checkout built in place
    sys.path.insert(0, ROOT)
    import convt_ext
from convt_ext.bench.overhead import per_call_us  # noqa: E402
from emulated_ops import emulated  # noqa: E402

CALLS, REPEATS = 2000, 7
GOALS = {"forward": 15.0, "forward+backward": 40.0}


def cases():
    """(label, kind, call): conv2d and conv_transpose2d with the GPU's plan, forward and
    forward+backward (the backward's ops as the Autograd kernel calls them)."""
    e = emulated()
    x, w, g = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 3, 3), torch.randn(1, 1, 2, 2)
    one, zero = [1, 1], [0, 0]

    def conv_step():
        e.conv_gpu_plan(x, w, None, one, zero, one, 1)
        e.conv_transpose_gpu_plan(g, w, None, one, zero, zero, 1, one)
        e.conv_weight_gpu_plan(x, g, [1, 1, 3, 3], one, zero, one, 1)

    def conv_transpose_step():
        e.conv_transpose_gpu_plan(g, w, None, one, zero, zero, 1, one)
        e.conv_transpose_backward_gpu_plan(x, g, w, one, zero, zero, 1, one)

    return [
        ("conv2d, GPU plan", "forward", lambda: e.conv_gpu_plan(x, w, None, one, zero, one, 1)),
        ("conv2d, GPU plan, forward+backward", "forward+backward", conv_step),
        ("conv_transpose2d, GPU plan", "forward", lambda: e.conv_transpose_gpu_plan(g, w, None, one, zero, zero, 1, one)),
        ("conv_transpose2d, GPU plan, fwd+bwd", "forward+backward", conv_transpose_step),
    ]


def measure(calls=CALLS, repeats=REPEATS):
    """[(label, microseconds per call, goal)] with the aten engine pinned, on one thread."""
    threads, engine = torch.get_num_threads(), convt_ext.gemm_engine()
    torch.set_num_threads(1)
    convt_ext.set_gemm_engine("aten")
    try:
        return [(label, per_call_us(fn, calls, repeats), GOALS[kind]) for label, kind, fn in cases()]
    finally:
        convt_ext.set_gemm_engine(engine)
        torch.set_num_threads(threads)


def main(calls=CALLS, repeats=REPEATS):
    print(f"GPU plan host cost per call, on the CPU (tiny tensors, aten engine, 1 thread); torch {torch.__version__}")
    print(f"{'call':38} {'us':>8} {'goal us':>8} met")
    for label, us, goal in measure(calls, repeats):
        print(f"{label:38} {us:8.1f} {goal:8.1f} {'yes' if round(us, 1) <= goal else 'no'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
