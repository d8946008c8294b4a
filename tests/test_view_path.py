"""The view path (Note [im2col as a view] in csrc/conv/view.h): CPU float32 conv,
conv_transpose and the weight gradient as per-tap GEMMs on strided views of
channels-last memory.

Every case here forces the path (set_conv_path("view")) and asserts through
engine_info()["path"]["calls"] that it ran and that the column path did not, so
a routing regression fails the test instead of silently testing the columns.
Expected values come from torch.nn.functional / torch.nn.grad in float64; the
float32 tolerance is the worst-case bound of a float32 sum of L products,
|error| <= L * eps * (|x| * |w|), elementwise, with the magnitudes from the same
float64 torch op on absolute values and L the reduction length of that output.
"""
import dataclasses
import math
import os
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import convt_ext
from conftest import Ran, make_tensor

pytestmark = pytest.mark.skipif(
    not convt_ext.engine_info()["path"]["view_available"],
    reason="the view path needs oneDNN's ukernel (at::native::cpublas::brgemm) to run float32 on this CPU",
)

EPS32 = torch.finfo(torch.float32).eps
OPS = ("conv", "conv_transpose", "conv_weight")


# ------------------------------------------------------------------ fixtures and helpers


@contextmanager
def _path(setting):
    old = convt_ext.conv_path()
    convt_ext.set_conv_path(setting)
    try:
        yield
    finally:
        convt_ext.set_conv_path(old)


@pytest.fixture
def view_path():
    """Forces the view path; puts the previous setting back."""
    with _path("view"):
        yield


@pytest.fixture
def ieee_fp32():
    """float32 convolutions in IEEE float32 for the test (the view path's
    precondition), whatever the session's torch.backends.mkldnn.conv flag."""
    old = torch.backends.mkldnn.conv.fp32_precision
    torch.backends.mkldnn.conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        torch.backends.mkldnn.conv.fp32_precision = old


def assert_view_ran(ran, calls=None):
    assert ran.columns == 0, f"{ran.columns} call(s) took the column path"
    if calls is None:
        assert ran.view > 0, "the view path did not run"
    else:
        assert ran.view == calls, f"{ran.view} view call(s), expected {calls}"
    assert ran.gemms > 0, "the view path ran no tap GEMM"


def pixel_layout(t):
    """t (N, C, *spatial) with the same values in pixel memory (N, *spatial, C):
    channels_last for 4-d, channels_last_3d for 5-d, its analogue for 3-d."""
    order = (0, *range(2, t.dim()), 1)
    inverse = [order.index(i) for i in range(t.dim())]
    return t.permute(order).contiguous().permute(inverse)


def in_pixel_memory(t):
    """Whether t (N, C, *spatial) is stored as (N, *spatial, C), contiguous."""
    return t.permute(0, *range(2, t.dim()), 1).is_contiguous()


def layout(t, how):
    return pixel_layout(t) if how == "cl" else t.contiguous()


def stride_order(t):
    """The dimensions from outermost to innermost in memory (size-1 dimensions,
    whose strides carry no order, left out)."""
    dims = [i for i in range(t.dim()) if t.size(i) != 1]
    return sorted(dims, key=lambda i: (-t.stride(i), i))


def assert_within(got, want, magnitude, length, what):
    """|got - want| <= length * eps32 * magnitude elementwise (float32 sum of
    `length` products), and no NaN."""
    assert got.dtype == torch.float32, what
    assert tuple(got.shape) == tuple(want.shape), what
    err = (got.double() - want).abs()
    bound = length * EPS32 * magnitude + 1e-30
    excess = err - bound
    worst = int(excess.argmax())
    assert not torch.isnan(got).any(), f"{what}: NaN"
    assert bool((excess <= 0).all()), (
        f"{what}: |error| {err.flatten()[worst].item():.3g} > bound {bound.flatten()[worst].item():.3g} "
        f"at flat index {worst} (max |error| {err.max().item():.3g}, L={length})"
    )


def _windows(size, kernel, stride, padding, dilation):
    return tuple((s + 2 * p - d * (k - 1) - 1) // st + 1 for s, k, st, p, d in zip(size, kernel, stride, padding, dilation))


def _image(size, kernel, stride, padding, dilation, output_padding):
    return tuple((s - 1) * st - 2 * p + d * (k - 1) + op + 1
                 for s, k, st, p, d, op in zip(size, kernel, stride, padding, dilation, output_padding))


# ------------------------------------------------------------------ the case table


@dataclasses.dataclass(frozen=True)
class Case:
    """One call. `size` is the input's spatial size (conv, conv_weight: the image;
    conv_transpose: the windows). `layouts` are those of (input, weight) for conv
    and conv_transpose, (input, grad_output) for conv_weight: "nchw" or "cl"."""

    op: str
    n: int
    c_in: int
    c_out: int
    size: tuple
    kernel: tuple
    stride: tuple = None
    padding: tuple = None
    dilation: tuple = None
    groups: int = 1
    output_padding: tuple = None
    bias: bool = True
    layouts: tuple = ("nchw", "nchw")

    def __post_init__(self):
        d = len(self.size)
        for name in ("kernel", "stride", "padding", "dilation", "output_padding"):
            value = getattr(self, name)
            default = 0 if name in ("padding", "output_padding") else 1
            value = default if value is None else value
            object.__setattr__(self, name, tuple(value) if isinstance(value, tuple) else (value,) * d)

    @property
    def dims(self):
        return len(self.size)

    @property
    def geometry(self):
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)

    @property
    def out_size(self):
        if self.op == "conv_transpose":
            return _image(self.size, self.kernel, self.stride, self.padding, self.dilation, self.output_padding)
        return _windows(self.size, self.kernel, self.stride, self.padding, self.dilation)

    @property
    def weight_shape(self):
        if self.op == "conv_transpose":
            return (self.c_in, self.c_out // self.groups, *self.kernel)
        return (self.c_out, self.c_in // self.groups, *self.kernel)

    @property
    def id(self):
        g = lambda t: "x".join(map(str, t))  # noqa: E731
        parts = [f"{self.op}{self.dims}d", f"n{self.n}", f"{self.c_in}to{self.c_out}", g(self.size), f"k{g(self.kernel)}",
                 f"s{g(self.stride)}", f"p{g(self.padding)}", f"d{g(self.dilation)}", f"g{self.groups}"]
        if any(self.output_padding):
            parts.append(f"op{g(self.output_padding)}")
        if self.op != "conv_weight":
            parts.append("bias" if self.bias else "nobias")
        parts.append("-".join(self.layouts))
        return "-".join(parts)


C, T, W = "conv", "conv_transpose", "conv_weight"
NC, CL = "nchw", "cl"

CASES = [
    # ---- conv
    Case(C, 2, 6, 9, (300,), (3,), padding=1, groups=3),  # a long sequence: > kSpan (256) windows
    Case(C, 1, 4, 4, (17,), (2,), stride=3, padding=2, dilation=2, bias=False, layouts=(CL, NC)),
    Case(C, 2, 5, 70, (9, 7), (3, 3), padding=1, layouts=(CL, NC)),  # > 4 output rows, > 64 output channels
    Case(C, 3, 6, 6, (11, 9), (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=6),  # depthwise
    Case(C, 2, 4, 6, (7, 5), (1, 1), stride=2, groups=2, bias=False),  # 1x1, strided
    Case(C, 1, 4, 6, (5, 6), (1, 1), padding=1, layouts=(CL, CL)),  # 1x1, padded
    Case(C, 2, 5, 3, (6, 5), (1, 1)),  # 1x1 stride 1 on an NCHW input (not the pixel-rows path)
    Case(C, 2, 6, 6, (13, 12), (3, 3), stride=3, padding=2, dilation=2, groups=3, bias=False, layouts=(CL, NC)),
    Case(C, 2, 5, 7, (8, 9), (3, 3), padding=1, layouts=(NC, CL)),  # channels_last weight only
    Case(C, 2, 4, 6, (5, 6, 7), (3, 2, 3), stride=(1, 2, 1), padding=(1, 0, 2), dilation=(2, 1, 1), groups=2),
    Case(C, 1, 3, 5, (6, 5, 7), (2, 2, 2), stride=2, padding=1, bias=False, layouts=(CL, CL)),
    # ---- conv_transpose
    Case(T, 2, 6, 9, (280,), (3,), padding=1, groups=3),  # > kSpan output positions
    Case(T, 1, 4, 5, (9,), (3,), stride=2, padding=2, dilation=3, output_padding=2, bias=False),  # op >= stride
    Case(T, 2, 8, 70, (5, 4), (3, 3), stride=2, padding=1, output_padding=1, layouts=(CL, NC)),
    Case(T, 3, 5, 5, (7, 6), (2, 3), stride=(3, 1), padding=(0, 1), dilation=(1, 2), groups=5, output_padding=(1, 0)),
    Case(T, 2, 4, 6, (4, 5), (1, 1), stride=2, groups=2, output_padding=1, bias=False, layouts=(CL, CL)),
    Case(T, 1, 6, 6, (5, 7), (3, 3), stride=3, padding=2, dilation=2, groups=3, output_padding=(2, 1), layouts=(CL, NC)),
    Case(T, 2, 5, 7, (6, 5), (3, 2), padding=(1, 0), layouts=(NC, CL)),
    Case(T, 2, 5, 3, (6, 5), (1, 1)),  # 1x1 stride 1, NCHW input
    Case(T, 2, 4, 6, (3, 40), (3, 3), stride=2, padding=1, layouts=(CL, NC)),  # the row form: rows of >= 32
    Case(T, 1, 3, 4, (8, 16), (2, 2), stride=(3, 4), padding=(0, 1), output_padding=(2, 3)),  # outputs no tap reaches
    Case(T, 2, 4, 70, (9, 10), (3, 3), stride=2, padding=1, output_padding=1),  # the plane: a 9 x 11 phase pair
    Case(T, 2, 4, 6, (3, 4, 5), (2, 3, 2), stride=(2, 1, 2), padding=(0, 1, 1), dilation=(1, 1, 2), groups=2,
         output_padding=(1, 0, 0), layouts=(CL, CL)),
    Case(T, 1, 3, 4, (4, 3, 5), (3, 1, 2), stride=1, padding=(1, 0, 0), dilation=(2, 1, 1), output_padding=(1, 0, 0),
         bias=False),  # output_padding >= stride where dilation > stride
    # ---- the weight gradient (layouts: input, grad_output)
    Case(W, 3, 6, 9, (270,), (3,), padding=1, groups=3),  # > kSpan windows
    Case(W, 1, 4, 6, (19,), (3,), stride=2, padding=2, dilation=2, layouts=(CL, CL)),
    Case(W, 2, 70, 6, (9, 7), (3, 3), padding=1, layouts=(CL, CL)),  # > 4 rows, > 64 input channels (the GEMM's N)
    Case(W, 3, 6, 6, (11, 9), (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=6),
    Case(W, 2, 6, 6, (13, 12), (3, 3), stride=3, padding=2, dilation=2, groups=3, layouts=(CL, NC)),
    Case(W, 1, 5, 7, (8, 9), (2, 3), padding=(0, 1), layouts=(NC, CL)),
    Case(W, 2, 4, 6, (7, 5), (1, 1), stride=2, groups=2),
    Case(W, 2, 4, 6, (5, 6, 7), (3, 2, 3), stride=(1, 2, 1), padding=(1, 0, 2), dilation=(2, 1, 1), groups=2),
    Case(W, 1, 3, 5, (6, 5, 7), (2, 2, 2), stride=2, padding=1, layouts=(CL, CL)),
    # ---- conv on the folded form (Note [The folded batch]): rows of <= 28 pixels, <= 256 in the batch
    Case(C, 8, 20, 70, (5, 5), (3, 3), padding=1),  # > 64 output channels
    Case(C, 4, 6, 6, (3, 5, 9), (3, 2, 3), stride=(2, 1, 1), padding=(1, 0, 2), dilation=(1, 2, 1), groups=3,
         layouts=(CL, CL)),
    Case(C, 16, 4, 5, (6, 10), (3, 3), padding=1, bias=False, layouts=(CL, NC)),  # > 128 GEMM rows an output row
    Case(C, 8, 5, 7, (9,), (3,), padding=1),
    Case(C, 6, 8, 70, (9, 10), (3, 3), stride=2, padding=1, layouts=(NC, CL)),  # stride 2 along the row
    Case(C, 4, 4, 6, (7, 14), (2, 3), stride=(1, 3), padding=(0, 2), dilation=(1, 2), groups=2, bias=False,
         layouts=(CL, NC)),  # stride 3, dilated, an image row that is no multiple of the stride
    Case(T, 2, 4, 6, (6, 7), (3, 3), padding=3, layouts=(CL, NC)),  # stride 1, but d(k - 1) < p: not folded
    Case(T, 8, 4, 6, (9,), (3,), padding=1, dilation=2, groups=2),  # folded, as the direct conv
    # ---- the weight gradient on the folded form: two panels of input channels for every core (up to 16)
    Case(W, 4, 64, 64, (6, 7), (3, 3), stride=(1, 2), padding=1, groups=32, layouts=(NC, CL)),
    Case(W, 3, 130, 9, (5, 4, 6), (2, 3, 3), padding=(0, 1, 1), dilation=(1, 1, 2), layouts=(CL, NC)),
]


def _seed(case):
    return sum(ord(ch) * (i + 1) for i, ch in enumerate(case.id)) % (2**31)


def _tensors(case):
    """float32 (first, second, bias) for the case, in its layouts."""
    gen = torch.Generator().manual_seed(_seed(case))
    first = torch.randn(case.n, case.c_in, *case.size, generator=gen)
    if case.op == "conv_weight":
        second = torch.randn(case.n, case.c_out, *case.out_size, generator=gen)
    else:
        second = torch.randn(case.weight_shape, generator=gen)
    bias = torch.randn(case.c_out, generator=gen) if case.bias and case.op != "conv_weight" else None
    return layout(first, case.layouts[0]), layout(second, case.layouts[1]), bias


def _ours(case, a, b, bias):
    d = case.dims
    if case.op == "conv":
        return getattr(convt_ext, f"conv{d}d")(a, b, bias, **case.geometry)
    if case.op == "conv_transpose":
        g = case.geometry
        return getattr(convt_ext, f"conv_transpose{d}d")(a, b, bias, g["stride"], g["padding"], case.output_padding,
                                                         g["groups"], g["dilation"])
    return getattr(convt_ext, f"conv{d}d_weight")(a, case.weight_shape, b, **case.geometry)


def _torch(case, a, b, bias):
    d = case.dims
    if case.op == "conv":
        return getattr(F, f"conv{d}d")(a, b, bias, **case.geometry)
    if case.op == "conv_transpose":
        g = case.geometry
        return getattr(F, f"conv_transpose{d}d")(a, b, bias, g["stride"], g["padding"], case.output_padding,
                                                 g["groups"], g["dilation"])
    return getattr(torch.nn.grad, f"conv{d}d_weight")(a, case.weight_shape, b, **case.geometry)


def _reduction_length(case):
    """Products summed into one output element (+1 for the bias)."""
    taps = math.prod(case.kernel)
    if case.op == "conv_weight":
        return case.n * math.prod(case.out_size)
    return case.c_in // case.groups * taps + 1


def _reference(case, a, b, bias):
    """(float64 torch result, float64 magnitudes |a| (*) |b| + |bias|)."""
    a, b = a.double(), b.double()
    bias = None if bias is None else bias.double()
    want = _torch(case, a, b, bias)
    magnitude = _torch(case, a.abs(), b.abs(), None if bias is None else bias.abs())
    return want, magnitude


def _expected_tap_gemms(case, image_pixels):
    """The tap GEMMs the view path runs, from the geometry alone.

    Row form (conv_transpose but where _phase_gemms applies; conv and the
    weight gradient on a channels-last image with output rows of >= 32): one per (sample, outer positions of the
    rows a task owns, kSpan-segment of the last dimension, kernel tap, group,
    64-wide block of the GEMM's N) where some position of the segment has that
    tap inside the image.

    Folded form (conv where _folded says): one per (output row along
    dimensions 0 and 1, kernel tap inside the image there, group, 64-wide
    block of N, block of 128 of the GEMM rows: the batch's pixels of the row
    that the tap reaches).

    Plane form (conv and the weight gradient otherwise): one per (sample,
    outer output position, block of 128 virtual rows, kernel tap whose outer
    offset lands inside the image, group, 64-wide block of N), where a plane
    row is ceil(span / s) virtual pixels wide, span being the image columns the
    output row's taps cover."""
    span, block = 256, 64
    size = case.size
    d = case.dims
    lift = lambda t, fill: (fill,) * (3 - d) + tuple(t)  # noqa: E731
    kernel, stride, padding, dilation = (lift(v, f) for v, f in ((case.kernel, 1), (case.stride, 1), (case.padding, 0),
                                                                  (case.dilation, 1)))
    if case.op == "conv_transpose":
        windows, image = lift(size, 1), lift(case.out_size, 1)
        owned = image  # a task owns output (image) rows
        n_block = case.c_out // case.groups
    else:
        windows, image = lift(case.out_size, 1), lift(size, 1)
        owned = windows
        n_block = case.c_out // case.groups if case.op == "conv" else case.c_in // case.groups

    def hits(i, p, k):
        """Whether owned position p along dimension i meets tap k."""
        if case.op == "conv_transpose":
            q = p + padding[i] - k * dilation[i]
            return q % stride[i] == 0 and 0 <= q // stride[i] < windows[i]
        return 0 <= p * stride[i] - padding[i] + k * dilation[i] < image[i]

    if case.op == "conv_transpose" and not image_pixels:
        phase_gemms = _phase_gemms(case, kernel, stride, padding, dilation, windows, image, hits)
        if phase_gemms is not None:
            return case.n * phase_gemms * case.groups * -(-n_block // block)
    if (case.op == "conv" and _folded(case)) or (case.op == "conv_weight" and _folded_weight(case)):
        return _folded_gemms(case.n, kernel, stride, padding, dilation, windows, image, case.op == "conv") * \
            case.groups * -(-n_block // block)
    if case.op == "conv_transpose" and _folded_transpose(case):
        # relationship 14 at stride 1: conv over the input (the windows) at padding d(k - 1) - p
        direct = tuple(d * (k - 1) - p for k, p, d in zip(kernel, padding, dilation))
        return _folded_gemms(case.n, kernel, (1, 1, 1), direct, dilation, image, windows, True) * \
            case.groups * -(-n_block // block)
    if case.op != "conv_transpose" and (not image_pixels or windows[2] < 32):
        cover = (windows[2] - 1) * stride[2] + (kernel[2] - 1) * dilation[2] + 1
        virtual = windows[1] * -(-cover // stride[2])
        taps0 = sum(hits(0, p, k0) for p in range(owned[0]) for k0 in range(kernel[0]))
        return case.n * taps0 * kernel[1] * kernel[2] * -(-virtual // 128) * case.groups * -(-n_block // block)
    count = 0
    for k0 in range(kernel[0]):
        rows0 = sum(hits(0, p, k0) for p in range(owned[0]))
        for k1 in range(kernel[1]):
            rows1 = sum(hits(1, p, k1) for p in range(owned[1]))
            for k2 in range(kernel[2]):
                segments = sum(any(hits(2, p, k2) for p in range(m0, min(m0 + span, owned[2])))
                               for m0 in range(0, owned[2], span))
                count += rows0 * rows1 * segments
    return case.n * count * case.groups * -(-n_block // block)


def _folded(case):
    """Whether conv takes the folded form: output rows of at most 28 pixels,
    at most 256 of them in the batch."""
    width = case.out_size[-1]
    return width <= 28 and case.n * width <= 256


def _folded_gemms(n, kernel, stride, padding, dilation, windows, image, blocks_of_128):
    """The folded form's GEMMs for one group and panel, conv's geometry (3-d,
    lifted): one per (output row along dimensions 0 and 1, tap inside the
    image there and along the row), split into blocks of 128 GEMM rows for
    conv (the weight gradient: one GEMM, its K the row's pixels)."""
    def hits(i, p, k):
        return 0 <= p * stride[i] - padding[i] + k * dilation[i] < image[i]

    count = 0
    for k0 in range(kernel[0]):
        for k1 in range(kernel[1]):
            rows = sum(hits(0, p0, k0) and hits(1, p1, k1) for p0 in range(windows[0]) for p1 in range(windows[1]))
            for k2 in range(kernel[2]):
                reach = sum(hits(2, p, k2) for p in range(windows[2]))
                count += rows * ((-(-(reach * n) // 128) if blocks_of_128 else 1) if reach else 0)
    return count


def _folded_transpose(case):
    """Whether conv_transpose takes the folded form: stride 1, d(k - 1) >= p,
    and the direct conv (over the input, out to its output) folded."""
    width = case.out_size[-1]
    return (max(case.stride) == 1 and all(d * (k - 1) >= p for k, p, d in zip(case.kernel, case.padding, case.dilation))
            and width <= 28 and case.n * width <= 256)


def _folded_weight(case):
    """Whether the weight gradient takes the folded form: where conv would,
    with two 64-wide panels of input channels for every core the machine
    lends (convt_ext's tasks_at_once, a constant of the process)."""
    panels = case.groups * -(-(case.c_in // case.groups) // 64)
    return _folded(case) and panels >= 2 * convt_ext._C.usable_cores()


def _phase_gemms(case, kernel, stride, padding, dilation, windows, image, hits):
    """conv_transpose's plane form (a planar input whose first phase pair has
    at least 64 virtual rows; None otherwise), per sample and group and 64-wide block of N:
    one GEMM per (output position along dimension 0, tap k0 that reaches it,
    output phase pair (r1, r2), block of 128 virtual rows of that pair, tap
    (k1, k2) of that pair). Along dimensions 1 and 2 the outputs q with
    (q + p) % s == r form phase r, reached by the taps k with k*d = r (mod s)
    from input position (q + p - k*d) / s; a virtual row of every phase is as
    wide as the input positions that all phases read."""

    def phases(i):
        found = []
        for r in range(stride[i]):
            js = [(q + padding[i]) // stride[i] for q in range(image[i]) if (q + padding[i]) % stride[i] == r]
            taps = [k for k in range(kernel[i]) if k * dilation[i] % stride[i] == r]
            if js and taps:
                reads = [j - (k * dilation[i] - r) // stride[i] for j in js for k in taps]
                found.append((len(js), len(taps), min(reads), max(reads)))
        return found

    p1, p2 = phases(1), phases(2)
    if not p1 or not p2:
        return None
    width = max(hi for *_, hi in p2) - min(lo for *_, lo, _ in p2) + 1
    if p1[0][0] * width < 64:
        return None  # the row form: a phase pair of fewer than 64 virtual rows
    per_plane = sum(t1 * t2 * -(-(n1 * width) // 128) for n1, t1, *_ in p1 for _, t2, *_ in p2)
    outer = sum(hits(0, p, k0) for p in range(image[0]) for k0 in range(kernel[0]))
    return outer * per_plane


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_view_matches_torch_float64(case, view_path, ieee_fp32):
    a, b, bias = _tensors(case)
    saved = [t.clone() for t in (a, b, bias) if t is not None]
    with Ran() as ran:
        got = _ours(case, a, b, bias)
    assert_view_ran(ran, calls=1)
    assert ran.gemms == _expected_tap_gemms(case, in_pixel_memory(a))
    want, magnitude = _reference(case, a, b, bias)
    assert_within(got, want, magnitude, _reduction_length(case), case.id)
    # the caller's tensors are left as they were, bitwise
    for before, after in zip(saved, (t for t in (a, b, bias) if t is not None)):
        assert torch.equal(before, after)
    # the output's memory format is torch's for the same float32 call
    assert stride_order(got) == stride_order(_torch(case, a, b, bias)), (got.stride(), case.id)


# ------------------------------------------------------------------ the full backward


@dataclasses.dataclass(frozen=True)
class Backward:
    """conv or conv_transpose (`case.op`) differentiated with respect to `wrt`
    ("all": input, weight and bias; "input"; "weight")."""

    case: Case
    wrt: str

    @property
    def id(self):
        return f"{self.case.id}-wrt_{self.wrt}"


BACKWARD = [
    Backward(Case(C, 2, 6, 9, (300,), (3,), padding=1, groups=3), "all"),
    Backward(Case(C, 2, 6, 70, (9, 8), (3, 3), stride=2, padding=1, layouts=(CL, NC)), "all"),
    Backward(Case(C, 1, 5, 7, (8, 9), (3, 2), padding=(1, 0), layouts=(NC, CL)), "all"),
    Backward(Case(C, 3, 6, 6, (11, 9), (3, 3), padding=2, dilation=2, groups=6, bias=False), "input"),
    Backward(Case(C, 2, 4, 6, (5, 6, 5), (3, 2, 3), stride=(1, 2, 1), padding=1, groups=2, layouts=(CL, CL)), "weight"),
    Backward(Case(T, 2, 4, 5, (9,), (3,), stride=2, padding=2, dilation=3, output_padding=2), "all"),
    Backward(Case(T, 2, 8, 70, (5, 4), (3, 3), stride=2, padding=1, output_padding=1, groups=2, layouts=(CL, NC)), "all"),
    Backward(Case(T, 1, 5, 7, (6, 5), (3, 2), padding=(1, 0), layouts=(NC, CL)), "all"),
    Backward(Case(T, 3, 5, 5, (7, 6), (2, 3), stride=(3, 1), padding=(0, 1), dilation=(1, 2), groups=5,
                  output_padding=(1, 0)), "input"),
    Backward(Case(T, 2, 6, 6, (5, 7), (3, 3), stride=3, padding=2, dilation=2, groups=3, output_padding=(2, 1),
                  bias=False, layouts=(CL, CL)), "weight"),
    Backward(Case(T, 2, 4, 6, (3, 4, 3), (2, 3, 2), stride=(2, 1, 2), padding=(0, 1, 1), groups=2,
                  output_padding=(1, 0, 1), layouts=(CL, CL)), "all"),
    # its input gradient is a conv on the folded form
    Backward(Case(T, 8, 6, 5, (6, 7), (3, 3), padding=1, layouts=(CL, NC)), "input"),
]


class _OpLog(TorchDispatchMode):
    """The names of the ops that reach the dispatcher below autograd."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


def _grads(case, wrt, a, b, bias, dy, ours):
    a = a.detach().requires_grad_(wrt in ("all", "input"))
    b = b.detach().requires_grad_(wrt in ("all", "weight"))
    bias = None if bias is None else bias.detach().requires_grad_(wrt == "all")
    out = (_ours if ours else _torch)(case, a, b, bias)
    out.backward(dy)
    return [t.grad for t in (a, b, bias) if t is not None and t.requires_grad]


@pytest.mark.parametrize("item", BACKWARD, ids=lambda b: b.id)
def test_backward_on_the_view_path(item, view_path, ieee_fp32):
    case, wrt = item.case, item.wrt
    a, b, bias = _tensors(case)
    gen = torch.Generator().manual_seed(_seed(case) + 1)
    dy = torch.randn(case.n, case.c_out, *case.out_size, generator=gen)
    saved = [t.clone() for t in (a, b, bias, dy) if t is not None]
    with Ran() as ran, _OpLog() as log:
        got = _grads(case, wrt, a, b, bias, dy, ours=True)
    # the forward, and one view call per op of the backward: one per gradient
    # of input or weight, or conv_transpose's fused backward for both
    fused = "convt_ext::_conv_transpose_backward" in log.names
    assert fused == (case.op == "conv_transpose" and wrt == "all"), log.names
    assert_view_ran(ran, calls=1 + (2 if wrt == "all" and not fused else 1))
    want = _grads(case, wrt, a.double(), b.double(), None if bias is None else bias.double(), dy.double(), ours=False)
    magnitude = _grads(case, wrt, a.double().abs(), b.double().abs(), None if bias is None else bias.double().abs(),
                       dy.double().abs(), ours=False)
    taps = math.prod(case.kernel)
    # input gradient: a sum over the other side's channels and taps; weight and
    # bias gradients: over the samples and the positions of the larger side
    lengths = {"input": case.c_out // case.groups * taps,
               "weight": case.n * math.prod(case.out_size if case.op == "conv" else case.size),
               "bias": case.n * math.prod(case.out_size)}
    names = [n for n, t in (("input", a), ("weight", b), ("bias", bias))
             if t is not None and (wrt == "all" or wrt == n)]
    assert len(got) == len(want) == len(names)
    for name, g, w, m in zip(names, got, want, magnitude):
        # conv_transpose's weight gradient sums over its input's positions (the windows)
        length = lengths[name] if not (case.op == "conv_transpose" and name == "weight") else case.n * math.prod(case.size)
        assert_within(g, w, m, length, f"{item.id}: grad {name}")
    for before, after in zip(saved, (t for t in (a, b, bias, dy) if t is not None)):
        assert torch.equal(before, after)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("how", ["transposed", "sliced", "channels_last", "offset", "batch_slice_cl"])
def test_strided_and_offset_operands(op, how, view_path, ieee_fp32):
    """Operands that are neither contiguous nor in pixel memory (copied once),
    or in pixel memory at a storage offset (read in place), and a strided bias."""
    gen = torch.Generator().manual_seed(len(op) * 7 + len(how))
    case = Case(op, 2, 6, 8, (7, 6), (3, 2), stride=(2, 1), padding=1, groups=2,
                output_padding=(1, 0) if op == "conv_transpose" else 0)
    a, b, _ = _tensors(case)
    if how == "batch_slice_cl":
        a = pixel_layout(torch.randn(case.n + 1, *a.shape[1:], generator=gen))[1:]
        assert a.storage_offset() > 0
    else:
        a = make_tensor(a.shape, gen, how, dtype=torch.float32)
        b = make_tensor(b.shape, gen, how, dtype=torch.float32)
    bias = torch.randn(2 * case.c_out, generator=gen)[::2] if op != "conv_weight" else None
    saved = [t.clone() for t in (a, b, bias) if t is not None]
    with Ran() as ran:
        got = _ours(case, a, b, bias)
    assert_view_ran(ran, calls=1)
    want, magnitude = _reference(case, a, b, bias)
    assert_within(got, want, magnitude, _reduction_length(case), f"{op} {how}")
    for before, after in zip(saved, (t for t in (a, b, bias) if t is not None)):
        assert torch.equal(before, after)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_unbatched_input(dims, view_path, ieee_fp32):
    gen = torch.Generator().manual_seed(dims)
    size = (9, 8, 7)[:dims]
    x, w, b = torch.randn(5, *size, generator=gen), torch.randn(6, 5, *(3,) * dims, generator=gen), torch.randn(6, generator=gen)
    wt = torch.randn(5, 4, *(2,) * dims, generator=gen)
    with Ran() as ran:
        y = getattr(convt_ext, f"conv{dims}d")(x, w, b, padding=1)
        yt = getattr(convt_ext, f"conv_transpose{dims}d")(x, wt, None, stride=2, output_padding=1)
    assert_view_ran(ran, calls=2)
    x64 = x.double()
    conv, conv_t = getattr(F, f"conv{dims}d"), getattr(F, f"conv_transpose{dims}d")
    assert_within(y, conv(x64, w.double(), b.double(), padding=1),
                  conv(x64.abs(), w.double().abs(), b.double().abs(), padding=1), 5 * 3**dims + 1, "conv")
    assert_within(yt, conv_t(x64, wt.double(), None, stride=2, output_padding=1),
                  conv_t(x64.abs(), wt.double().abs(), None, stride=2, output_padding=1), 5 * 2**dims, "conv_transpose")


def test_conv_transpose_with_a_huge_stride_over_one_input_row(view_path, ieee_fp32):
    """Over a one-row input the stride does not change the output (one window
    position), so stride 10**12 must give stride 1's result, with the phases
    found from the taps, not by a loop over the stride."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(2, 16, 1, 70, generator=gen)  # planar, and 71 virtual rows: the phase form
    w = torch.randn(16, 20, 3, 2, generator=gen)
    with Ran() as ran:
        got = convt_ext.conv_transpose2d(x, w, None, (10**12, 1), (1, 0))
    assert_view_ran(ran, calls=1)
    want = F.conv_transpose2d(x.double(), w.double(), None, 1, (1, 0))
    assert got.shape == want.shape == (2, 20, 1, 71)
    assert (got.double() - want).abs().max() <= 1e-4 * want.abs().max()


@pytest.mark.parametrize("setting", ["view", "auto"])
def test_a_huge_last_stride_falls_back_to_the_columns(setting, ieee_fp32):
    """A leading dimension the ukernel cannot address (s2 * C floats over a span of
    rows, past 2^31 bytes: oneDNN's descriptors hold them as int) goes to the column
    path, which computes it; the view path raised std::bad_alloc there. The plain
    conv2d backward reaches it: its input gradient is a conv_transpose at that stride."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 16, 3, 2, generator=gen)
    w = torch.randn(16, 16, 2, 2, generator=gen)
    with _path(setting):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        with Ran() as ran:
            y = convt_ext.conv2d(xg, wg, None, (1, 2**26))
            got = torch.autograd.grad(y, [xg, wg], torch.ones_like(y))
            yt = convt_ext.conv_transpose2d(x[:, :, :, :1], w, None, (1, 2**25))
    assert ran.view == 0 and ran.columns > 0
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    y64 = F.conv2d(x64, w64, None, (1, 2**26))
    want = torch.autograd.grad(y64, [x64, w64], torch.ones_like(y64))
    torch.testing.assert_close(y.double(), y64.detach(), rtol=1e-5, atol=1e-5)
    for g, e in zip(got, want):
        torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-5)
    # One input column: the output is stride 1's, two columns apart.
    want_t = F.conv_transpose2d(x[:, :, :, :1].double(), w.double(), None, 1)
    assert yt.shape == (1, 16, 4, 2)
    torch.testing.assert_close(yt.double(), want_t, rtol=1e-5, atol=1e-5)


def test_a_large_stride_within_the_ukernels_reach_keeps_the_view(view_path, ieee_fp32):
    """The bound is on what the ukernel addresses, not on strides as such: a stride
    of 1024 over 16 channels (leading dimension 16384 floats) still runs the view."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(1, 16, 3, 3, generator=gen)
    w = torch.randn(16, 16, 2, 2, generator=gen)
    with Ran() as ran:
        got = convt_ext.conv_transpose2d(x, w, None, (1, 1024))
    assert_view_ran(ran, calls=1)
    torch.testing.assert_close(got.double(), F.conv_transpose2d(x.double(), w.double(), None, (1, 1024)),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", OPS)
def test_empty_batch(op, view_path, ieee_fp32):
    """Nothing to compute: the view path is not asked, and the shape is torch's."""
    case = Case(op, 0, 4, 6, (5, 6), (3, 3), padding=1, groups=2)
    a, b, bias = _tensors(case)
    with Ran() as ran:
        got = _ours(case, a, b, bias)
    assert ran.view == 0
    want = _torch(case, a, b, bias)
    assert got.shape == want.shape
    if op == "conv_weight":
        assert torch.count_nonzero(got) == 0


FAKE_CASES = [c for c in CASES if c.dims > 1][::3] + [CASES[0], CASES[11], CASES[21]]


@pytest.mark.parametrize("case", FAKE_CASES, ids=lambda c: c.id)
def test_fake_kernels_agree_with_the_view_path(case, view_path, ieee_fp32):
    """torch.compile traces with the fake kernels: their shapes and strides must be
    the real op's (torch.library.opcheck compares them)."""
    a, b, bias = _tensors(case)
    d, g = case.dims, case.geometry
    if case.op == "conv":
        op, args = f"conv{d}d", (a, b, bias, g["stride"], g["padding"], g["dilation"], g["groups"])
    elif case.op == "conv_transpose":
        op, args = f"conv_transpose{d}d", (a, b, bias, g["stride"], g["padding"], case.output_padding, g["groups"],
                                           g["dilation"])
    else:
        op, args = f"conv{d}d_weight", (a, b, case.weight_shape, g["stride"], g["padding"], g["dilation"], g["groups"])
    args = tuple(list(v) if isinstance(v, tuple) else v for v in args)
    with Ran() as ran:
        torch.library.opcheck(getattr(torch.ops.convt_ext, op).default, args, test_utils=("test_faketensor",))
    assert_view_ran(ran)


@pytest.mark.parametrize("layouts", [(NC, NC), (CL, CL)], ids="-".join)
def test_fused_conv_transpose_backward_strides_match_its_fake(layouts, view_path, ieee_fp32):
    case = Case(T, 2, 4, 6, (5, 6), (3, 3), stride=2, padding=1, output_padding=1, layouts=layouts)
    x, w, _ = _tensors(case)
    dy = layout(torch.randn(case.n, case.c_out, *case.out_size, generator=torch.Generator().manual_seed(3)), layouts[0])
    args = (dy, x, w, list(case.stride), list(case.padding), list(case.output_padding), case.groups, list(case.dilation))
    op = torch.ops.convt_ext._conv_transpose_backward.default
    with Ran() as ran:
        grad_input, grad_weight = op(*args)
    assert_view_ran(ran, calls=1)  # one op call, counted once (path.h)
    # the values are right ...
    x64, w64, dy64 = x.double().requires_grad_(), w.double().requires_grad_(), dy.double()
    F.conv_transpose2d(x64, w64, None, 2, 1, 1).backward(dy64)
    assert_within(grad_input, x64.grad, F.conv2d(dy64.abs(), w64.detach().abs(), None, 2, 1), 6 * 9, "grad_input")
    # ... the strides are not the ones torch.compile traced with
    with Ran() as ran:
        torch.library.opcheck(op, args, test_utils=("test_faketensor",))
    assert_view_ran(ran, calls=1)


# ------------------------------------------------------------------ the tables' own coverage


def test_case_tables_cover_what_they_claim():
    table = CASES + [b.case for b in BACKWARD]
    for op in OPS:
        for d in (1, 2, 3):
            assert any(c.op == op and c.dims == d for c in CASES), (op, d)
    for op in OPS:
        cases = [c for c in CASES if c.op == op]
        assert any(c.n > 1 for c in cases) and any(c.n == 1 for c in cases), op
        assert any(c.groups > 1 for c in cases), op
        assert any(c.groups == c.c_in == c.c_out for c in cases), op  # depthwise
        assert any(max(c.stride) > 1 for c in cases), op
        assert any(max(c.padding) == 0 for c in cases) and any(max(c.padding) > 0 for c in cases), op
        assert any(max(c.dilation) > 1 for c in cases), op
        assert any(len(set(c.kernel)) > 1 for c in cases), op  # non-square
        assert any(math.prod(c.kernel) == 1 for c in cases), op
        assert any(any(s % 2 for s in c.size) for c in cases), op  # odd sizes
        assert {l for c in cases for l in c.layouts} == {NC, CL}, op
        assert any(c.layouts == (CL, NC) for c in cases) and any(c.layouts == (NC, CL) for c in cases), op
        assert any(c.layouts == (CL, CL) for c in cases) and any(c.layouts == (NC, NC) for c in cases), op
        # the task span: > 256 positions along the last dimension of the side a task owns
        # (out_size: the windows for conv and conv_weight, the image for conv_transpose)
        assert any(c.dims == 1 and c.out_size[0] > 256 for c in cases), op
        # the row block (> 4 owned rows) and the N block (> 64 channels per group on the GEMM's N side)
        n_side = (lambda c: c.c_in // c.groups) if op == "conv_weight" else (lambda c: c.c_out // c.groups)
        assert any(c.dims == 2 and c.out_size[0] > 4 and n_side(c) > 64 for c in cases), op
        if op != "conv_weight":
            assert any(c.bias for c in cases) and any(not c.bias for c in cases), op
    for s in (1, 2, 3):
        assert any(max(c.stride) == s for c in table), s
    for p in (0, 1, 2):
        assert any(p in c.padding for c in table), p
    for g in (1, 2, 3):
        assert any(c.groups == g for c in table), g
    for k in (1, 2, 3):
        assert any(k in c.kernel for c in table), k
    transposes = [c for c in CASES if c.op == "conv_transpose"]
    assert any(max(c.output_padding) > 0 for c in transposes)
    assert any(any(op >= s and d > s for op, s, d in zip(c.output_padding, c.stride, c.dilation)) for c in transposes)
    # backward: both ops, the fused pair and single gradients, with and without bias
    for op in ("conv", "conv_transpose"):
        items = [b for b in BACKWARD if b.case.op == op]
        assert {b.wrt for b in items} == {"all", "input", "weight"}, op
        assert {b.case.dims for b in items} == {1, 2, 3}, op
        assert any(b.case.n > 1 for b in items) and any(b.case.n == 1 for b in items), op
        assert any(b.case.groups > 1 for b in items), op
        assert any(b.case.bias and b.wrt == "all" for b in items), op
    # the folded form: conv in 1/2/3-d, an output row of more than 128 GEMM rows, and not in the others
    folded = [c for c in CASES if c.op == "conv" and _folded(c)]
    assert {c.dims for c in folded} == {1, 2, 3}
    assert any(c.n * c.out_size[-1] > 128 for c in folded)
    assert any(c.c_out // c.groups > 64 for c in folded) and any(c.groups > 1 for c in folded)
    assert {c.stride[-1] for c in folded} >= {1, 2, 3} and any(c.size[-1] % c.stride[-1] for c in folded)
    assert any(not _folded(c) for c in CASES if c.op == "conv")
    assert any(c.op == "conv_weight" and _folded_weight(c) and c.groups > 1 for c in CASES)
    transposes = [c for c in CASES if c.op == "conv_transpose" and max(c.stride) == 1]
    assert any(_folded_transpose(c) and any(c.output_padding) for c in transposes)
    assert any(_folded_transpose(c) and c.dims == 1 for c in transposes)
    assert any(not _folded_transpose(c) for c in transposes)
    assert any(c.op == "conv_weight" and _folded(c) and not _folded_weight(c) for c in CASES)
    # conv_transpose's input gradient: conv of grad_output (its output) back to its input
    assert any(b.case.op == "conv_transpose" and b.wrt == "input" and _folded(
        Case(C, b.case.n, b.case.c_out, b.case.c_in, b.case.out_size, b.case.kernel, b.case.stride, b.case.padding,
             b.case.dilation)) for b in BACKWARD)
    # every case takes the view path when forced: none is the pixel-rows 1x1 on channels_last
    for c in table:
        pointwise = math.prod(c.kernel) == 1 and max(c.stride) == 1 and max(c.padding) == 0 and not any(c.output_padding)
        assert not (pointwise and c.layouts[0] == CL), c.id


# ------------------------------------------------------------------ memory format


# torch's 1-d output follows a weight stored (O, k, C) into (N, L, C) memory, but 1-d
# has no channels_last format and both of convt_ext's paths return it contiguous:
# not the view path's choice, so those two are left out here.
FORMAT_CASES = [(op, dims, layouts) for op in OPS for dims in (1, 2, 3)
                for layouts in ((NC, NC), (CL, NC), (NC, CL), (CL, CL))
                if not (dims == 1 and op != "conv_weight" and layouts[1] == CL)]


@pytest.mark.parametrize("op, dims, layouts", FORMAT_CASES, ids=lambda v: "-".join(v) if isinstance(v, tuple) else str(v))
def test_output_memory_format_is_torchs(op, dims, layouts, view_path, ieee_fp32):
    size = {1: (11,), 2: (7, 6), 3: (5, 4, 6)}[dims]
    case = Case(op, 2, 4, 6, size, (3,) * dims, stride=2, padding=1, groups=2,
                output_padding=1 if op == "conv_transpose" else 0, layouts=layouts)
    a, b, bias = _tensors(case)
    with Ran() as ran:
        got = _ours(case, a, b, bias)
    assert_view_ran(ran, calls=1)
    want = _torch(case, a, b, bias)
    assert stride_order(got) == stride_order(want), (got.stride(), want.stride())
    assert got.is_contiguous() == want.is_contiguous()


# ------------------------------------------------------------------ routing: the pixel-rows path, "auto", float64, "columns"


def test_pointwise_channels_last_keeps_the_pixel_rows_path(view_path, ieee_fp32):
    """A 1x1, stride-1, unpadded layer on a channels_last input: its pixels' rows
    are already the GEMM's operands, so even a forced view leaves it to that path
    (engine_info counts conv's under "columns", conv_transpose's under neither)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 5, 6, generator=gen).to(memory_format=torch.channels_last)
    w = torch.randn(12, 8, 1, 1, generator=gen)
    dy = torch.randn(2, 12, 5, 6, generator=gen).to(memory_format=torch.channels_last)
    with Ran() as ran:
        y = convt_ext.conv2d(x, w)
        xt = convt_ext.conv_transpose2d(dy, w)
        dw = convt_ext.conv2d_weight(x, w.shape, dy)
    assert ran.view == 0
    x64, w64, dy64 = x.double(), w.double(), dy.double()
    assert_within(y, F.conv2d(x64, w64), F.conv2d(x64.abs(), w64.abs()), 8, "conv")
    assert_within(xt, F.conv_transpose2d(dy64, w64), F.conv_transpose2d(dy64.abs(), w64.abs()), 12, "conv_transpose")
    assert_within(dw, torch.nn.grad.conv2d_weight(x64, w.shape, dy64),
                  torch.nn.grad.conv2d_weight(x64.abs(), w.shape, dy64.abs()), 60, "conv_weight")
    for got in (y, xt):
        assert got.is_contiguous(memory_format=torch.channels_last)


def _layer(c_in, c_out, k, dtype=torch.float32, groups=1, padding=None):
    gen = torch.Generator().manual_seed(c_in * 1000 + c_out * 10 + k)
    x = torch.randn(1, c_in, 10, 9, generator=gen, dtype=dtype)
    w = torch.randn(c_out, c_in // groups, k, k, generator=gen, dtype=dtype)
    dy = torch.randn(1, c_out, 10, 9, generator=gen, dtype=dtype)
    p = k // 2 if padding is None else padding
    return x, w, dy, dict(padding=p, groups=groups)


def _three(x, w, dy, geometry):
    return [convt_ext.conv2d(x, w, **geometry), convt_ext.conv_transpose2d(dy, w, **geometry),
            convt_ext.conv2d_weight(x, w.shape, dy, **geometry)]


def _three_torch(x, w, dy, geometry):
    x, w, dy = x.double(), w.double(), dy.double()
    return [F.conv2d(x, w, **geometry), F.conv_transpose2d(dy, w, **geometry),
            torch.nn.grad.conv2d_weight(x, w.shape, dy, **geometry)]


def _cl(*tensors):
    return [t.contiguous(memory_format=torch.channels_last) for t in tensors]


def test_auto_takes_the_view_for_a_typical_channels_last_layer(ieee_fp32):
    """In pixel memory the view path saves the copy on every CPU: auto takes it."""
    with _path("auto"):
        assert convt_ext.engine_info()["path"]["setting"] == "auto"
        x, w, dy, geometry = _layer(64, 64, 3)
        x, dy = _cl(x, dy)
        with Ran() as ran:
            got = _three(x, w, dy, geometry)
        assert_view_ran(ran, calls=3)
        for g, want in zip(got, _three_torch(x, w, dy, geometry)):
            assert (g.double() - want).abs().max() <= 1e-4 * want.abs().max()


@pytest.mark.parametrize("c_in, c_out, k, groups", [
    (64, 64, 1, 1),   # 1x1: no columns to save
    (3, 64, 3, 1),    # a first layer: 3 input channels
    (64, 3, 3, 1),    # 3 output channels
    (34, 30, 3, 2),   # 17 input and 15 output channels per group: past the depthwise path's rule too
], ids=["1x1", "3_in", "3_out", "17_and_15_per_group"])
def test_auto_takes_the_columns_elsewhere(c_in, c_out, k, groups, ieee_fp32):
    with _path("auto"):
        x, w, dy, geometry = _layer(c_in, c_out, k, groups=groups)
        with Ran() as ran:
            got = _three(x, w, dy, geometry)
        assert ran.view == 0 and ran.columns == 3
        for g, want in zip(got, _three_torch(x, w, dy, geometry)):
            assert (g.double() - want).abs().max() <= 1e-4 * want.abs().max()


def test_auto_on_planar_inputs_follows_the_rule_for_this_cpu(ieee_fp32):
    """NCHW: with AVX-512 the view everywhere; with AVX2 where the windows
    overlap: conv_transpose, and conv and its weight gradient while a tap's
    block is at most 128 x 256 (the rule, view_rule, decides; its table is below)."""
    avx512 = convt_ext.engine_info()["cpu_avx512"]
    with _path("auto"):
        x, w, dy, geometry = _layer(64, 64, 3)
        with Ran() as ran:
            got = _three(x, w, dy, geometry)
        assert ran.view == 3 and ran.columns == 0
        for g, want in zip(got, _three_torch(x, w, dy, geometry)):
            assert (g.double() - want).abs().max() <= 1e-4 * want.abs().max()
        x, w, dy, geometry = _layer(256, 256, 3)
        with Ran() as ran:
            got = _three(x, w, dy, geometry)
        assert ran.view == (3 if avx512 else 1) and ran.columns == 3 - ran.view
        for g, want in zip(got, _three_torch(x, w, dy, geometry)):
            assert (g.double() - want).abs().max() <= 1e-4 * want.abs().max()


@pytest.mark.parametrize("avx512", [False, True])
def test_the_rule_as_a_table(avx512):
    rule = convt_ext._C.view_rule
    ops = ("conv", "conv_transpose", "conv_weight", "conv_transpose_backward")
    for op in ops:
        # too few channels on either side, or 1x1: never
        for cg_image, cg_windows, pointwise in ((15, 64, False), (64, 15, False), (64, 64, True)):
            assert not rule(op, avx512, True, True, 2, True, cg_image, cg_windows, pointwise)
        # in pixel memory already: always
        assert rule(op, avx512, True, True, 2, True, 16, 16, False)
    for op in ops:
        # planar, 2-d, overlapping windows: AVX2 takes the view for conv_transpose, and for the
        # others while K x N <= 128 x 256
        assert rule(op, avx512, False, False, 2, True, 128, 256, False)
        assert rule(op, avx512, False, False, 2, True, 256, 129, False) == (avx512 or op == "conv_transpose")
        # planar 3-d: the view where the windows overlap; planar 1-d, or windows apart: only with AVX-512
        assert rule(op, avx512, False, False, 3, True, 512, 512, False)
        assert rule(op, avx512, False, False, 3, False, 64, 64, False) == avx512
        assert rule(op, avx512, False, False, 2, False, 64, 64, False) == avx512
        assert rule(op, avx512, False, False, 1, True, 64, 64, False) == avx512
    # conv_transpose on planar input, AVX2: 2-d or 3-d overlapping windows only
    assert rule("conv_transpose", False, False, False, 3, True, 64, 64, False)
    assert not rule("conv_transpose", False, False, False, 1, True, 64, 64, False)
    assert not rule("conv_transpose", False, False, False, 2, False, 64, 64, False)
    assert rule("conv_transpose", avx512, False, True, 1, False, 64, 64, False)
    with pytest.raises(ValueError, match="op must be one of"):
        rule("deconv", avx512, True, True, 2, True, 64, 64, False)


def test_auto_boundary_is_16_channels_per_group(ieee_fp32):
    with _path("auto"):
        x, w, dy, geometry = _layer(32, 32, 3, groups=2)
        x, dy = _cl(x, dy)
        with Ran() as ran:
            _three(x, w, dy, geometry)
        assert_view_ran(ran, calls=3)


def test_float64_never_takes_the_view(view_path):
    x, w, dy, geometry = _layer(64, 64, 3, dtype=torch.float64)
    with Ran() as ran:
        got = _three(x, w, dy, geometry)
    assert ran.view == 0 and ran.columns == 3
    for g, want in zip(got, _three_torch(x, w, dy, geometry)):
        torch.testing.assert_close(g, want)


def test_columns_forced_never_takes_the_view(ieee_fp32):
    with _path("columns"):
        for c_in, c_out, k in ((64, 64, 3), (32, 48, 3), (16, 16, 1)):
            x, w, dy, geometry = _layer(c_in, c_out, k)
            with Ran() as ran:
                got = _three(x, w, dy, geometry)
                xl = x.to(memory_format=torch.channels_last)
                convt_ext.conv2d(xl, w, **geometry)
            assert ran.view == 0 and ran.columns >= 3
            for g, want in zip(got, _three_torch(x, w, dy, geometry)):
                assert (g.double() - want).abs().max() <= 1e-4 * want.abs().max()


# ------------------------------------------------------------------ determinism, the workspace limit, precision


@pytest.fixture
def restore_threads():
    old = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("layouts", [(NC, NC), (CL, CL)], ids="-".join)
def test_bitwise_the_same_for_1_to_4_threads(layouts, view_path, ieee_fp32, restore_threads):
    cases = [Case(C, 3, 24, 40, (14, 13), (3, 3), padding=1, layouts=layouts),
             Case(C, 8, 24, 70, (6, 6), (3, 3), padding=1, layouts=layouts),  # folded
             Case(W, 8, 64, 64, (6, 6), (3, 3), padding=1, groups=32, layouts=layouts),  # folded, 32 panels
             Case(T, 3, 24, 40, (7, 7), (3, 3), stride=2, padding=1, output_padding=1, layouts=layouts),
             Case(W, 3, 24, 40, (14, 13), (3, 3), padding=1, layouts=layouts),
             Case(W, 2, 6, 8, (600,), (3,), padding=1, groups=2, layouts=layouts)]
    for case in cases:
        a, b, bias = _tensors(case)
        results = []
        for threads in (1, 2, 3, 4):
            torch.set_num_threads(threads)
            with Ran() as ran:
                results.append(_ours(case, a, b, bias))
            assert_view_ran(ran, calls=1)
        for threads, r in zip((2, 3, 4), results[1:]):
            assert torch.equal(results[0], r), (case.id, threads)
        want, magnitude = _reference(case, a, b, bias)
        assert_within(results[0], want, magnitude, _reduction_length(case), case.id)


# Calls whose view-path buffers exceed 4 KiB (the weights alone, or the weight
# gradient's per-task rows of grad_output).
LIMITED = [CASES[2], CASES[13], Case(C, 2, 16, 16, (5, 6, 5), (3, 3, 3), padding=1, layouts=(CL, NC)),
           Case(T, 2, 32, 40, (300,), (3,), padding=1)] + [c for c in CASES if c.op == "conv_weight"][:5]


@pytest.mark.parametrize("case", LIMITED, ids=lambda c: c.id)
def test_tiny_workspace_limit_falls_back_to_columns(case, view_path, ieee_fp32, restore_workspace_limit):
    a, b, bias = _tensors(case)
    convt_ext.set_workspace_limit(1 << 12)
    with Ran() as ran:
        got = _ours(case, a, b, bias)
    assert ran.view == 0 and ran.columns == 1
    want, magnitude = _reference(case, a, b, bias)
    assert_within(got, want, magnitude, _reduction_length(case), case.id)


def test_the_limit_counts_the_call_not_the_setting(view_path, ieee_fp32, restore_workspace_limit):
    """The same call takes the view again once the limit is back."""
    case = CASES[2]
    a, b, bias = _tensors(case)
    convt_ext.set_workspace_limit(1 << 12)
    with Ran() as ran:
        small = _ours(case, a, b, bias)
    assert ran.view == 0 and ran.columns == 1
    convt_ext.set_workspace_limit(restore_workspace_limit)
    with Ran() as ran:
        large = _ours(case, a, b, bias)
    assert_view_ran(ran, calls=1)
    want, magnitude = _reference(case, a, b, bias)
    for got in (small, large):
        assert_within(got, want, magnitude, _reduction_length(case), case.id)


@pytest.fixture
def restore_precision():
    old = torch.backends.mkldnn.conv.fp32_precision
    try:
        yield
    finally:
        torch.backends.mkldnn.conv.fp32_precision = old


def test_fp32_precision_bf16_rule(view_path, restore_precision):
    x, w, dy, geometry = _layer(32, 32, 3)
    torch.backends.mkldnn.conv.fp32_precision = "bf16"
    in_bf16 = convt_ext.engine_info()["fp32_in_bf16"]
    with Ran() as ran:
        _three(x, w, dy, geometry)
    if in_bf16:
        assert ran.view == 0 and ran.columns == 3
    else:
        assert_view_ran(ran, calls=3)
    torch.backends.mkldnn.conv.fp32_precision = "ieee"
    assert not convt_ext.engine_info()["fp32_in_bf16"]
    with Ran() as ran:
        got = _three(x, w, dy, geometry)
    assert_view_ran(ran, calls=3)
    for g, want in zip(got, _three_torch(x, w, dy, geometry)):
        assert (g.double() - want).abs().max() <= 1e-4 * want.abs().max()


# ------------------------------------------------------------------ the setting


def test_set_conv_path_and_engine_info():
    old = convt_ext.conv_path()
    try:
        for setting in ("view", "columns", "depthwise", "benchmark", "auto"):
            convt_ext.set_conv_path(setting)
            assert convt_ext.conv_path() == setting
            assert convt_ext.engine_info()["path"]["setting"] == setting
            assert convt_ext.build_info()["conv_path"] == setting
        path = convt_ext.engine_info()["path"]
        assert set(path) == {"setting", "view_available", "depthwise_isa", "depthwise_loops", "calls", "benchmarked"}
        assert set(path["calls"]) == {"view", "columns", "depthwise"}
        assert set(path["depthwise_loops"]) == {
            "pixels", "phase_planes", "blocked_planes", "plane_rows", "output_phases", "weight_pixels",
            "weight_planes", "weight_blocked_planes"}
    finally:
        convt_ext.set_conv_path(old)


@pytest.mark.parametrize("bad", ["fast", "", "View", " view", "im2col"])
def test_set_conv_path_refuses_a_wrong_value(bad):
    before = convt_ext.conv_path()
    with pytest.raises(ValueError, match="path must be one of"):
        convt_ext.set_conv_path(bad)
    assert convt_ext.conv_path() == before


@pytest.mark.parametrize("bad", [1, None, b"view", True, ["view"]])
def test_set_conv_path_refuses_a_non_str(bad):
    before = convt_ext.conv_path()
    with pytest.raises(TypeError, match="path must be a str"):
        convt_ext.set_conv_path(bad)
    assert convt_ext.conv_path() == before


def _python(code, value):
    """Starts `code` in a fresh interpreter importing the same convt_ext as this process
    (in-place build or installed package), with CONVT_EXT_CONV_PATH=value."""
    env = dict(os.environ)
    env["CONVT_EXT_CONV_PATH"] = value
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(convt_ext.__file__)))
    env["PYTHONPATH"] = package_parent + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen([sys.executable, "-P", "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_environment_variable():
    code = ("import torch, convt_ext; x = torch.randn(1, 16, 6, 6); w = torch.randn(16, 16, 3, 3); "
            "convt_ext.conv2d(x, w); p = convt_ext.engine_info()['path']; "
            "print(convt_ext.conv_path(), p['calls']['view'], p['calls']['columns'])")
    # two fresh interpreters at once (each mostly imports torch)
    columns, bogus = _python(code, "columns"), _python("import convt_ext", "bogus")
    for proc in (columns, bogus):
        proc.out, proc.err = proc.communicate(timeout=300)
    assert columns.returncode == 0, columns.err
    assert columns.out.split() == ["columns", "0", "1"]
    assert bogus.returncode != 0
    assert "ValueError" in bogus.err and "CONVT_EXT_CONV_PATH" in bogus.err and "bogus" in bogus.err, bogus.err


def test_benchmark_mode_times_both_paths_once_per_geometry(ieee_fp32):
    """"benchmark": the first call of a geometry times the view and the column
    path and keeps the faster (reported with both times); later calls reuse the
    choice; results are torch's either way; under deterministic algorithms it is
    "auto" (nothing timed)."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 32, 11, 13, generator=gen)
    w = torch.randn(32, 32, 3, 3, generator=gen)
    want = F.conv2d(x.double(), w.double(), None, 1, 1)
    with _path("benchmark"):
        assert convt_ext.conv_path() == "benchmark"
        before = {tuple(b["key"]) for b in convt_ext.engine_info()["path"]["benchmarked"]}
        for _ in range(3):
            got = convt_ext.conv2d(x, w, None, 1, 1)
            assert (got.double() - want).abs().max() <= 1e-4 * want.abs().max()
        rows = [b for b in convt_ext.engine_info()["path"]["benchmarked"] if tuple(b["key"]) not in before]
        assert len(rows) == 1 and rows[0]["op"] == "conv"
        row = rows[0]
        seconds = row["seconds"]
        assert seconds["view"] > 0 and seconds["columns"] > 0
        assert row["path"] == min(seconds, key=seconds.get)
        with Ran() as ran:
            convt_ext.conv2d(x, w, None, 1, 1)
        assert (ran.view, ran.columns) == ((1, 0) if row["path"] == "view" else (0, 1))
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            count = len(convt_ext.engine_info()["path"]["benchmarked"])
            y = torch.randn(2, 32, 9, 17, generator=gen)
            convt_ext.conv2d(y, w, None, 1, 1)
            assert len(convt_ext.engine_info()["path"]["benchmarked"]) == count
        finally:
            torch.use_deterministic_algorithms(previous)
