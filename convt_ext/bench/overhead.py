"""Host overhead per call: python -m convt_ext.bench --overhead.

A tiny convolution (one channel, a 4x4 image, a 3x3 kernel) on CPU tensors
does almost no arithmetic, so its time per call is what a call costs before
and after the kernels run: argument handling, the dispatcher, the memory-format
decision, the autograd layer, allocations. That cost decides the speed of
small layers on a GPU, where the kernels themselves take microseconds. Each
figure is the median over repeats of the mean time of many back-to-back calls,
next to torch.nn.functional's for the same call (the machine may be shared:
medians, not minima). It runs on one thread unless told otherwise: with more,
every convolution's plan opens a parallel region (Note [Determinism across
thread counts] in csrc/plan.h), whose wake-up, on a loaded machine, costs far
more than the rest of the call; a GPU's plan opens none.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

import convt_ext

CALLS = 2000
REPEATS = 7


def _per_call_us(fn, calls, repeats):
    """Median over `repeats` of the mean microseconds per call of `calls` calls."""
    for _ in range(min(calls, 200)):  # warm-up: first-call caches, lazy registrations
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def cases():
    """(label, ours, torch's) for the tiny shapes: forward without a graph, forward
    building one, and forward+backward."""
    x = torch.randn(1, 1, 4, 4)
    w = torch.randn(1, 1, 3, 3)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    g = torch.randn(1, 1, 2, 2)
    xt = torch.randn(1, 1, 2, 2)
    xtg = xt.clone().requires_grad_()
    gt = torch.randn(1, 1, 4, 4)
    ours, theirs = convt_ext.functional, F
    return [
        ("conv2d, no graph", lambda: ours.conv2d(x, w), lambda: theirs.conv2d(x, w)),
        ("conv2d, building a graph", lambda: ours.conv2d(xg, wg), lambda: theirs.conv2d(xg, wg)),
        ("conv2d, forward+backward", lambda: ours.conv2d(xg, wg).backward(g), lambda: theirs.conv2d(xg, wg).backward(g)),
        ("conv_transpose2d, no graph", lambda: ours.conv_transpose2d(xt, w), lambda: theirs.conv_transpose2d(xt, w)),
        ("conv_transpose2d, forward+backward", lambda: ours.conv_transpose2d(xtg, wg).backward(gt),
         lambda: theirs.conv_transpose2d(xtg, wg).backward(gt)),
        ("conv2d_weight", lambda: ours.conv2d_weight(x, w.shape, g), lambda: torch.nn.grad.conv2d_weight(x, w.shape, g)),
    ]


def measure(calls=CALLS, repeats=REPEATS):
    """[(label, our microseconds per call, torch's)], each a median over repeats."""
    rows = []
    for label, ours, theirs in cases():
        # Interleaved, so that a burst of load on a shared machine hits both sides.
        a, b = [], []
        for _ in range(repeats):
            a.append(_per_call_us(ours, calls, 1))
            b.append(_per_call_us(theirs, calls, 1))
        rows.append((label, statistics.median(a), statistics.median(b)))
    return rows


def main(calls=None, repeats=None, threads=None):
    calls, repeats = calls or CALLS, repeats or REPEATS
    torch.set_num_threads(threads or 1)
    print(f"host overhead per call, CPU tensors (x 1x1x4x4, weight 1x1x3x3), {torch.get_num_threads()} threads, "
          f"median of {repeats} x {calls} calls; torch {torch.__version__}, convt_ext {convt_ext.__version__}")
    print(f"{'call':38} {'convt_ext us':>13} {'torch us':>9} {'ratio':>6}")
    for label, ours, theirs in measure(calls, repeats):
        print(f"{label:38} {ours:13.1f} {theirs:9.1f} {ours / theirs:6.2f}")
    return 0
