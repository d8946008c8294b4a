"""Depthwise 3x3 layers alone, each direction on its own: the forward, the
input gradient (conv_transpose) and the weight gradient, against the ones
torch's convolution_backward computes. The layers are MobileNetV2's at 160 px
(`python -m convt_ext.bench --model mobilenetv2` times them inside the model)
plus two; each direction is timed in interleaved rounds, ours and torch's, in
one process and in the bench's allocator state (benchmarks/NOTES.md item 34).

    python benchmarks/depthwise_layers.py [threads] [batch] [cl|nchw]

Prints ours/torch microseconds = torch's time over ours, a median of 9 rounds.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    import convt_ext  # the installed package
except ImportError:  # a checkout built in place
    sys.path.insert(0, ROOT)
    import convt_ext
import convt_ext.functional as CF
from convt_ext.bench.machine import set_allocator_state

# (channels, pixels a side, stride)
LAYERS = [(144, 40, 1), (144, 40, 2), (96, 80, 2), (32, 80, 1), (960, 5, 1), (192, 20, 1), (384, 10, 1),
          (576, 10, 1)]


def per_call_us(fn, calls):
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def directions(c, p, s, batch, channels_last):
    x = torch.randn(batch, c, p, p)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(c, 1, 3, 3)
    dy = torch.randn_like(F.conv2d(x, w, stride=s, padding=1, groups=c))
    output_padding = (p + 2 - 3) % s  # conv_transpose gives back the input's size
    geometry = dict(stride=s, padding=1, groups=c)
    backward = lambda mask: torch.ops.aten.convolution_backward(  # noqa: E731
        dy, x, w, None, [s, s], [1, 1], [1, 1], False, [0, 0], c, mask)
    return [
        ("fwd", lambda: CF.conv2d(x, w, **geometry), lambda: F.conv2d(x, w, **geometry)),
        ("gin", lambda: CF.conv_transpose2d(dy, w, output_padding=output_padding, **geometry),
         lambda: backward([True, False, False])),
        ("gw", lambda: CF.conv2d_weight(x, w.shape, dy, **geometry), lambda: backward([False, True, False])),
    ]


def main(threads=2, batch=8, fmt="cl"):
    set_allocator_state()
    torch.set_num_threads(threads)
    print(f"threads {threads} batch {batch} {fmt}; torch {torch.__version__}, convt_ext {convt_ext.__version__}")
    for c, p, s in LAYERS:
        line = f"C{c:4d} P{p:3d} s{s}"
        for name, ours, theirs in directions(c, p, s, batch, fmt == "cl"):
            ours(), theirs()
            start = time.perf_counter()
            ours()
            calls = max(2, int(0.02 / (time.perf_counter() - start)))
            a, b = [], []
            for _ in range(9):
                a.append(per_call_us(ours, calls))
                b.append(per_call_us(theirs, calls))
            ma, mb = statistics.median(a), statistics.median(b)
            line += f"  {name} {ma:6.0f}/{mb:6.0f}={mb / ma:4.2f}"
        print(line, flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    main(int(args[0]) if args else 2, int(args[1]) if len(args) > 1 else 8, args[2] if len(args) > 2 else "cl")
