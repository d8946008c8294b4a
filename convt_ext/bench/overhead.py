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


def per_call_us(fn, calls, repeats):
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


def _tiny(d, channels=1, size=4):
    """Tiny tensors of d spatial dimensions: x, w, the forward's upstream gradient g,
    a transposed convolution's input xt (which g's shape matches) and its gradient gt."""
    x = torch.randn(1, channels, *[size] * d)
    w = torch.randn(channels, channels, *[3] * d)
    g = torch.randn(1, channels, *[size - 2] * d)
    return x, w, g


def _convolution_rows(d):
    """conv and conv_transpose of d spatial dimensions: no graph, building one, forward+backward."""
    ours, theirs = convt_ext.functional, F
    x, w, g = _tiny(d)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    xt, gt = g.clone(), x.clone()  # a transposed convolution: g-shaped in, x-shaped out
    xtg = xt.clone().requires_grad_()
    conv, conv_t = getattr(ours, f"conv{d}d"), getattr(ours, f"conv_transpose{d}d")
    tconv, tconv_t = getattr(theirs, f"conv{d}d"), getattr(theirs, f"conv_transpose{d}d")
    return [
        (f"conv{d}d, no graph", lambda: conv(x, w), lambda: tconv(x, w)),
        (f"conv{d}d, building a graph", lambda: conv(xg, wg), lambda: tconv(xg, wg)),
        (f"conv{d}d, forward+backward", lambda: conv(xg, wg).backward(g), lambda: tconv(xg, wg).backward(g)),
        (f"conv_transpose{d}d, no graph", lambda: conv_t(xt, w), lambda: tconv_t(xt, w)),
        (f"conv_transpose{d}d, forward+backward", lambda: conv_t(xtg, wg).backward(gt),
         lambda: tconv_t(xtg, wg).backward(gt)),
    ]


def _window_rows():
    """The weight gradient, im2col and col2im, tiny."""
    ours = convt_ext.functional
    x, w, g = _tiny(2)
    xg = x.clone().requires_grad_()
    cols = torch.randn(1, 9, 4)
    colsg = cols.clone().requires_grad_()
    return [
        ("conv2d_weight", lambda: ours.conv2d_weight(x, w.shape, g), lambda: torch.nn.grad.conv2d_weight(x, w.shape, g)),
        ("im2col, no graph", lambda: convt_ext.im2col(x, 3), lambda: F.unfold(x, 3)),
        ("im2col, forward+backward", lambda: convt_ext.im2col(xg, 3).backward(cols), lambda: F.unfold(xg, 3).backward(cols)),
        ("col2im, no graph", lambda: convt_ext.col2im(cols, (4, 4), 3), lambda: F.fold(cols, (4, 4), 3)),
        ("col2im, forward+backward", lambda: convt_ext.col2im(colsg, (4, 4), 3).backward(x),
         lambda: F.fold(colsg, (4, 4), 3).backward(x)),
    ]


def _wide_rows():
    """A 64-channel layer with 8x8 outputs at batch 1: little arithmetic, still host-bound."""
    ours, theirs = convt_ext.functional, F
    x, w, g = _tiny(2, channels=64, size=10)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    xt, gt = g.clone(), x.clone()
    xtg = xt.clone().requires_grad_()
    return [
        ("conv2d 64ch 8x8, no graph", lambda: ours.conv2d(x, w), lambda: theirs.conv2d(x, w)),
        ("conv2d 64ch 8x8, forward+backward", lambda: ours.conv2d(xg, wg).backward(g),
         lambda: theirs.conv2d(xg, wg).backward(g)),
        ("conv_transpose2d 64ch 8x8, no graph", lambda: ours.conv_transpose2d(xt, w), lambda: theirs.conv_transpose2d(xt, w)),
        ("conv_transpose2d 64ch 8x8, fwd+bwd", lambda: ours.conv_transpose2d(xtg, wg).backward(gt),
         lambda: theirs.conv_transpose2d(xtg, wg).backward(gt)),
    ]


def cases():
    """(label, ours, torch's): forward without a graph, forward building one, and
    forward+backward of tiny tensors in 1, 2 and 3 dimensions; the weight gradient, im2col
    and col2im; and a 64-channel 8x8 layer, whose arithmetic is still small."""
    return [row for d in (1, 2, 3) for row in _convolution_rows(d)] + _window_rows() + _wide_rows()


def target_us(label, torch_us):
    """The goal for a row: tiny rows at most max(2x torch's time, torch's + 4 us);
    the 64-channel rows at least as fast as torch."""
    return torch_us if "64ch" in label else max(2 * torch_us, torch_us + 4)


def measure(calls=CALLS, repeats=REPEATS):
    """[(label, our microseconds per call, torch's)], each a median over repeats."""
    rows = []
    for label, ours, theirs in cases():
        # Interleaved, so that a burst of load on a shared machine hits both sides.
        a, b = [], []
        for _ in range(repeats):
            a.append(per_call_us(ours, calls, 1))
            b.append(per_call_us(theirs, calls, 1))
        rows.append((label, statistics.median(a), statistics.median(b)))
    return rows


def main(calls=None, repeats=None, threads=None):
    calls, repeats = calls or CALLS, repeats or REPEATS
    torch.set_num_threads(threads or 1)
    print(f"host overhead per call, CPU tensors (tiny: one channel, 4-pixel sides, a 3-tap kernel), {torch.get_num_threads()} threads, "
          f"median of {repeats} x {calls} calls; torch {torch.__version__}, convt_ext {convt_ext.__version__}")
    print(f"{'call':38} {'convt_ext us':>13} {'torch us':>9} {'ratio':>6} {'target us':>10} met")
    rows = measure(calls, repeats)
    met = 0
    for label, ours, theirs in rows:
        target = target_us(label, theirs)
        ok = round(ours, 1) <= round(target, 1)  # as printed
        met += ok
        print(f"{label:38} {ours:13.1f} {theirs:9.1f} {ours / theirs:6.2f} {target:10.1f} {'yes' if ok else 'no'}")
    print(f"{met} of {len(rows)} rows within target")
    return 0
