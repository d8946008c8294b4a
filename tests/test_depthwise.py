"""The depthwise path: grouped CPU convolutions computed directly, without a
GEMM, for depthwise layers (groups == C_in, C_out = m * C_in for any channel
multiplier m) and for few channels per group.

Forced with set_conv_path("depthwise") it runs wherever it can: floating
dtypes, at most 16 reduction channels per group (conv and conv_transpose:
C_in / groups), the weight gradient with both channel counts small. Every
forced case asserts through engine_info()["path"]["calls"] that the path ran
(one call per op: forward conv, forward conv_transpose, weight gradient,
conv_transpose's fused backward), so a routing regression fails the test
instead of silently testing another path.

Every expected value comes from torch.nn.functional in float64 (on the
float64 values of the inputs, rounded to the tested dtype first), never from
convt_ext; the reference calls are checked to run no convt_ext call.
"""
import dataclasses
import math
import random
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import convt_ext
from convt_ext import functional as CF
from conftest import Ran


DW = "depthwise"
LIMIT = 16  # the most reduction channels per group the depthwise path takes (conv, conv_transpose)
SMALL = 4  # per-group channel counts (both sides) taken as "small" for the weight gradient's domain
EPS32 = torch.finfo(torch.float32).eps


# ------------------------------------------------------------------ path setting and call counters


def calls(key=DW):
    """The CPU calls the path `key` ran so far (0 for a path this build lacks)."""
    return convt_ext.engine_info()["path"]["calls"].get(key, 0)


def assert_ran(ran, key, expected, what):
    """Exactly `expected` calls, all on the path `key` (the forced one)."""
    assert ran[key] == expected, (
        f"{what}: {ran[key]} call(s) on the {key!r} path, expected {expected}: the {key} path did not run "
        f"(calls per path: {ran.delta})"
    )
    assert ran.total == expected, f"{what}: calls on other paths too: {ran.delta}"


@contextmanager
def conv_path(setting):
    """Runs the block under set_conv_path(setting); puts the old setting back."""
    old = convt_ext.conv_path()
    try:
        convt_ext.set_conv_path(setting)
        yield
    finally:
        convt_ext.set_conv_path(old)


def _force_depthwise():
    """Sets the depthwise path; returns the key of the path that will run."""
    convt_ext.set_conv_path(DW)
    return DW


@contextmanager
def forced_path():
    """Runs the block with the depthwise path forced; gives the counter key to
    assert on; puts the old setting back."""
    old = convt_ext.conv_path()
    try:
        yield _force_depthwise()
    finally:
        convt_ext.set_conv_path(old)


@pytest.fixture
def forced():
    """Forces the depthwise path for the test; gives the counter key to assert on."""
    with forced_path() as key:
        yield key


@pytest.fixture
def no_plane_rows():
    """Turns plane rows (Note [Plane rows]) off for the test, so that the loops they take
    over keep their own tests; turns them back on."""
    old = convt_ext._C._set_plane_rows(False)
    try:
        yield
    finally:
        convt_ext._C._set_plane_rows(old)


@pytest.fixture
def threads():
    """Lets a test change torch's thread count; puts the old one back."""
    old = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ------------------------------------------------------------------ the cases


def _windows(size, k, s, p, d):
    return tuple((n + 2 * pp - dd * (kk - 1) - 1) // ss + 1 for n, kk, ss, pp, dd in zip(size, k, s, p, d))


def _image(size, k, s, p, d, op):
    return tuple((n - 1) * ss - 2 * pp + dd * (kk - 1) + o + 1 for n, kk, ss, pp, dd, o in zip(size, k, s, p, d, op))


CL = {2: torch.channels_last, 3: torch.channels_last_3d}


@dataclasses.dataclass(frozen=True)
class Case:
    """One call of conv or conv_transpose. `size` is the input's spatial size;
    `fmt` the input's memory: "contiguous", "channels_last" (channels_last or
    channels_last_3d) or "sliced" (every other sample and every other element
    of the last dimension of a larger tensor); `weight_cl`: the weight in
    channels_last memory too."""

    op: str
    kind: str
    n: int
    c_in: int
    c_out: int
    groups: int
    size: tuple
    kernel: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    output_padding: tuple = None
    bias: bool = True
    fmt: str = "contiguous"
    weight_cl: bool = False

    def __post_init__(self):
        if self.output_padding is None:
            object.__setattr__(self, "output_padding", (0,) * len(self.size))

    @property
    def dims(self):
        return len(self.size)

    @property
    def in_per_group(self):
        return self.c_in // self.groups

    @property
    def out_per_group(self):
        return self.c_out // self.groups

    @property
    def weight_shape(self):
        if self.op == "conv_transpose":
            return (self.c_in, self.out_per_group, *self.kernel)
        return (self.c_out, self.in_per_group, *self.kernel)

    @property
    def out_size(self):
        if self.op == "conv_transpose":
            return _image(self.size, self.kernel, self.stride, self.padding, self.dilation, self.output_padding)
        return _windows(self.size, self.kernel, self.stride, self.padding, self.dilation)

    @property
    def reduction(self):
        """Products summed into one output element, +1 for the bias."""
        return self.in_per_group * math.prod(self.kernel) + 1

    @property
    def forward_in_domain(self):
        return self.in_per_group <= LIMIT

    @property
    def backward_in_domain(self):
        """Every backward op (input gradient, weight gradient, or the fused
        conv_transpose backward) within the depthwise path's domain."""
        return max(self.in_per_group, self.out_per_group) <= SMALL

    @property
    def backward_calls(self):
        """conv: conv_transpose for the input gradient + the weight gradient;
        conv_transpose: its fused backward (input and weight gradients at once)."""
        return 2 if self.op == "conv" else 1

    def __str__(self):
        g = lambda t: "x".join(map(str, t))  # noqa: E731
        parts = [f"{self.op}{self.dims}d", self.kind, f"n{self.n}", f"{self.c_in}to{self.c_out}g{self.groups}",
                 g(self.size), f"k{g(self.kernel)}", f"s{g(self.stride)}", f"p{g(self.padding)}",
                 f"d{g(self.dilation)}"]
        if any(self.output_padding):
            parts.append(f"op{g(self.output_padding)}")
        parts += ["bias" if self.bias else "nobias", self.fmt + ("-wcl" if self.weight_cl else "")]
        return "-".join(parts)


# kind: (input channels per group, output channels per group or None: drawn)
KINDS = {"dw1": (1, 1), "dw2": (1, 2), "dw3": (1, 3), "g2": (2, None), "g4": (4, None)}
OPS = ("conv", "conv_transpose")


def _formats(dims):
    return ("contiguous", "sliced") if dims == 1 else ("contiguous", "channels_last", "sliced")


def _draw(r, op, dims, kind, fmt, index):
    """One valid case (non-empty batch and output), drawn from r. Batch, bias
    and (for 2-d and 3-d) per-dimension strides alternate with `index`, so
    that every combination of op, dims, format and kind sees both values."""
    in_g, out_g = KINDS[kind]
    while True:
        if kind.startswith("dw"):
            groups = r.choice((2, 3, 5) if dims < 3 else (2, 3))
        else:
            groups = r.choice((2, 3))
            out_g = r.choice((1, 2, 4)) if op == "conv" else r.choice((1, 2, 3))
        kmax = 5 if dims == 1 else 4 if dims == 2 else 3
        kernel = tuple(r.randint(1, kmax) for _ in range(dims))
        stride = tuple(r.randint(1, 3) for _ in range(dims))
        if dims > 1 and index % 2 == 1:  # different per dimension
            while len(set(stride)) == 1:
                stride = tuple(r.randint(1, 3) for _ in range(dims))
        dilation = tuple(r.choice((1, 2)) for _ in range(dims))
        # up to two past the half extent of the dilated kernel (more than kernel // 2)
        padding = tuple(r.randint(0, d * (k - 1) // 2 + 2) for k, d in zip(kernel, dilation))
        if op == "conv":
            size = tuple(r.randint(3, (13, 9, 6)[dims - 1]) for _ in range(dims))
            output_padding = (0,) * dims
        else:
            size = tuple(r.randint(2, (9, 6, 4)[dims - 1]) for _ in range(dims))
            padding = tuple(min(p, d * (k - 1)) for p, k, d in zip(padding, kernel, dilation))
            output_padding = tuple(r.randint(0, max(s, d) - 1) for s, d in zip(stride, dilation))
        case = Case(op, kind, (1, 3)[index % 2], groups * in_g, groups * out_g, groups, size, kernel, stride,
                    padding, dilation, output_padding, bias=(index // 2) % 2 == 0, fmt=fmt,
                    weight_cl=fmt == "channels_last" and r.random() < 0.5)
        if case.weight_cl and (case.weight_shape[1] == 1 or math.prod(kernel) == 1):
            # channels_last and contiguous strides coincide for this weight: no channels_last weight to test
            case = dataclasses.replace(case, weight_cl=False)
        if min(case.out_size) >= 1:
            return case


def _cases(per_combination=2, seed=20240611):
    r = random.Random(seed)
    cases = []
    for op in OPS:
        for dims in (1, 2, 3):
            for fmt in _formats(dims):
                for kind in KINDS:
                    for _ in range(per_combination):
                        cases.append(_draw(r, op, dims, kind, fmt, len(cases)))
    return cases


CASES = _cases()


def _tally(cases):
    """Cases per (op, dims, format)."""
    out = {}
    for c in cases:
        key = (c.op, c.dims, c.fmt)
        out[key] = out.get(key, 0) + 1
    return out


# ------------------------------------------------------------------ tensors and the calls


def _seed(case, salt=""):
    return sum(ord(ch) * (i + 1) for i, ch in enumerate(str(case) + salt)) % (2**31)


def _layout(t, fmt, gen):
    """t's values in the memory the format names."""
    if fmt == "contiguous":
        return t.contiguous()
    if fmt == "channels_last":
        return t.contiguous(memory_format=CL[t.dim() - 2])
    if fmt == "sliced":
        # every other sample and every other element of the last dimension, the others random
        big = torch.randn(2 * t.shape[0], *t.shape[1:-1], 2 * t.shape[-1] + 1, generator=gen, dtype=torch.float64)
        big = big.to(t.dtype)
        view = big[::2, ..., 1::2]
        view.copy_(t)
        return view
    raise ValueError(fmt)


def _tensors(case, dtype=torch.float64):
    """(input, weight, bias or None, upstream gradient) in float64 values
    rounded to dtype, input and weight in the case's memory."""
    gen = torch.Generator().manual_seed(_seed(case, str(dtype)))
    r = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    x = _layout(r(case.n, case.c_in, *case.size), case.fmt, gen)
    w = r(*case.weight_shape)
    if case.weight_cl:
        w = w.contiguous(memory_format=CL[case.dims])
    b = r(case.c_out) if case.bias else None
    dy = r(case.n, case.c_out, *case.out_size)
    return x, w, b, dy


def _call(fn_of, case, x, w, b):
    """The case's op from `fn_of(name)` (convt_ext.functional or torch's F), positional arguments."""
    if case.op == "conv":
        return fn_of(f"conv{case.dims}d")(x, w, b, case.stride, case.padding, case.dilation, case.groups)
    return fn_of(f"conv_transpose{case.dims}d")(x, w, b, case.stride, case.padding, case.output_padding, case.groups,
                                                case.dilation)


def ours(case, x, w, b):
    return _call(lambda name: getattr(CF, name), case, x, w, b)


def theirs(case, x, w, b):
    return _call(lambda name: getattr(F, name), case, x, w, b)


def _leaves(*tensors):
    return [None if t is None else t.detach().requires_grad_() for t in tensors]


def reference(case, x, w, b, dy):
    """torch's float64 output and gradients (input, weight, bias), on
    contiguous float64 copies, and their magnitudes (the same on |values|).
    Checked to make no convt_ext call."""
    results = []
    with Ran() as ran:
        for absolute in (False, True):
            f = (lambda t: None if t is None else t.detach().double().abs().contiguous()) if absolute else \
                (lambda t: None if t is None else t.detach().double().contiguous())
            xx, ww, bb = _leaves(f(x), f(w), f(b))
            out = theirs(case, xx, ww, bb)
            wrt = [t for t in (xx, ww, bb) if t is not None]
            grads = torch.autograd.grad(out, wrt, f(dy))
            results.append((out.detach(), list(grads)))
    assert ran.total == 0, f"the reference ran convt_ext calls: {ran.delta}"
    return results


def _scale(mag):
    return max(1.0, float(mag.abs().max())) if mag.numel() else 1.0


def assert_close64(got, want, mag, what):
    """float64: rtol 1e-10, atol 1e-12 times the largest magnitude."""
    assert got.dtype == torch.float64, f"{what}: dtype {got.dtype}"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, torch's {tuple(want.shape)}"
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12 * _scale(mag), msg=lambda m: f"{what}: {m}")


def assert_within(got, want, mag, rel, what, floor=1e-30):
    """|got - want| <= rel * mag elementwise (mag: the float64 op on |values|), no NaN."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, torch's {tuple(want.shape)}"
    g = got.detach().double()
    assert not torch.isnan(g).any(), f"{what}: NaN"
    err = (g - want).abs()
    bound = rel * mag + floor
    excess = err - bound
    if excess.numel():
        worst = int(excess.argmax())
        assert bool((excess <= 0).all()), (
            f"{what}: |error| {err.flatten()[worst].item():.3g} > bound {bound.flatten()[worst].item():.3g} "
            f"at flat index {worst} (max |error| {err.max().item():.3g})"
        )


def _check_memory(case, x, w):
    """The tensors are laid out as the case says."""
    if case.fmt == "contiguous":
        assert x.is_contiguous()
    elif case.fmt == "channels_last":
        assert x.is_contiguous(memory_format=CL[case.dims]) and not x.is_contiguous()
    else:
        assert not x.is_contiguous() and (case.dims == 1 or not x.is_contiguous(memory_format=CL[case.dims]))
    if case.weight_cl:
        assert w.is_contiguous(memory_format=CL[case.dims]) and not w.is_contiguous()
    else:
        assert w.is_contiguous()
    assert x.shape[0] >= 1 and x.shape[1] == case.c_in
    assert w.shape[1] == (case.in_per_group if case.op == "conv" else case.out_per_group)
    if case.kind.startswith("dw"):
        assert case.groups == case.c_in and case.in_per_group == 1 and case.c_out == int(case.kind[2:]) * case.c_in


# ------------------------------------------------------------------ 1. float64 parity, forward and gradients


# Beyond the table's cases, for the pixel loops (depthwise_loops.inc):
# - the weight gradient in several stretches of rows (the last of the thread cases below), in 2-d
#   and 3-d; the 40-pixel rows also end in a block that overlaps the one before it;
# - 59 channels: one block of each width, four vectors of float64, two, one, then 3 channels alone,
#   on rows whose interior does not run the unit-stride blocks (stride 2, 5-pixel rows,
#   conv_transpose at stride 2), where four vectors at a time run.
PIXEL_LOOP_CASES = [
    Case("conv", "dw1", 2, 64, 64, 64, (40, 40), (3, 3), (1, 1), (1, 1), (1, 1), fmt="channels_last"),
    Case("conv", "dw1", 2, 48, 48, 48, (9, 20, 21), (3, 3, 3), (1, 2, 1), (1, 1, 1), (1, 1, 1), fmt="channels_last"),
    Case("conv", "dw1", 2, 59, 59, 59, (13, 14), (3, 3), (2, 2), (1, 1), (1, 1), fmt="channels_last"),
    Case("conv", "dw1", 2, 59, 59, 59, (5, 5), (3, 3), (1, 1), (1, 1), (1, 1), fmt="channels_last"),
    Case("conv_transpose", "dw1", 2, 59, 59, 59, (7, 6), (3, 3), (2, 2), (1, 1), (1, 1), (1, 1),
         fmt="channels_last"),
]


# Unit-stride rows of the pixel loops (pixel_block_unit: kernel widths 3, 5, 7, conv's line and
# conv_transpose's reversed one) with edges in the padding on either side: a row of exactly one
# block, interiors of one or more blocks with tails, kernels wider than their padding and padding
# wider than the kernel's half, a row with no pixel inside the image's interior, and 59 channels
# (in float32 and float64: whole blocks of one and two vectors, then single channels).
UNIT_ROW_CASES = [
    Case("conv", "dw1", 2, 59, 59, 59, (3, 8), (3, 3), (1, 1), (1, 1), (1, 1), fmt="channels_last"),
    Case("conv", "dw1", 1, 59, 59, 59, (2, 20), (3, 3), (1, 1), (1, 1), (1, 1), fmt="channels_last"),
    Case("conv_transpose", "dw1", 1, 59, 59, 59, (3, 18), (3, 3), (1, 1), (1, 1), (1, 1), fmt="channels_last"),
    Case("conv", "dw1", 1, 59, 59, 59, (4, 26), (3, 5), (1, 1), (1, 1), (1, 1), fmt="channels_last"),
    Case("conv", "dw1", 1, 59, 59, 59, (2, 30), (3, 7), (1, 1), (1, 3), (1, 1), fmt="channels_last"),
    Case("conv", "dw1", 2, 32, 32, 32, (3, 11), (3, 7), (1, 1), (1, 3), (1, 1), fmt="channels_last"),
    Case("conv", "dw1", 1, 59, 59, 59, (3, 10), (1, 3), (1, 1), (0, 2), (1, 1), bias=False, fmt="channels_last"),
    Case("conv_transpose", "dw1", 1, 59, 59, 59, (3, 20), (3, 5), (1, 1), (1, 1), (1, 1), fmt="channels_last"),
    Case("conv_transpose", "dw1", 1, 59, 59, 59, (2, 24), (3, 7), (1, 1), (1, 2), (1, 1), fmt="channels_last"),
    Case("conv_transpose", "dw1", 1, 40, 40, 40, (3, 4), (3, 7), (1, 1), (1, 0), (1, 1), fmt="channels_last"),
    Case("conv", "dw1", 1, 48, 48, 48, (3, 4, 10), (3, 3, 3), (1, 1, 1), (1, 1, 2), (1, 1, 1),
         fmt="channels_last"),
]


# Planar grouped layers (conv_planar, transpose_planar) sum up to 4 output channels of a group at
# once: output channels per group of 4, 5 (a block of 4, then 1), 6, 7 and 8 (two blocks), so that
# every block size runs after a full one, in both directions, with odd rows at stride 2 for the
# output phases, in 1-d, 2-d and 3-d. The table's grouped cases draw at most 4 per group.
ROW_BLOCK_CASES = [
    Case("conv", "g8", 2, 16, 16, 2, (11, 13), (3, 3), (1, 1), (1, 1), (1, 1)),
    Case("conv", "g4", 1, 8, 10, 2, (9, 10), (3, 2), (2, 1), (1, 0), (1, 2), bias=False),
    Case("conv", "g2", 2, 6, 21, 3, (17,), (5,), (1,), (2,), (1,)),
    Case("conv", "g3", 1, 6, 12, 2, (4, 5, 6), (3, 3, 3), (1, 2, 1), (1, 1, 1), (1, 1, 1)),
    Case("conv_transpose", "g8", 2, 16, 16, 2, (7, 9), (4, 4), (2, 2), (1, 1), (1, 1), (0, 0)),
    Case("conv_transpose", "g2", 1, 4, 10, 2, (6, 7), (3, 3), (2, 1), (1, 1), (1, 1), (1, 0), bias=False),
    Case("conv_transpose", "g3", 2, 9, 12, 3, (13,), (4,), (2,), (1,), (1,), (1,)),
    Case("conv_transpose", "g1", 1, 3, 21, 3, (3, 4, 5), (2, 3, 3), (2, 1, 2), (0, 1, 1), (1, 1, 1), (1, 0, 0)),
    # channels_last: the planar loops run on planar copies, made and undone by tiles of 16 floats or 8
    # doubles in registers; here whole tiles and partial ones, in pixels and in channels.
    Case("conv", "g8", 2, 32, 40, 4, (9, 13), (3, 3), (1, 1), (1, 1), (1, 1), fmt="channels_last"),
    Case("conv_transpose", "g4", 1, 24, 20, 4, (5, 7), (3, 3), (2, 2), (1, 1), (1, 1), (1, 1), fmt="channels_last"),
    Case("conv", "g8", 1, 16, 16, 2, (4, 4, 5), (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), fmt="channels_last"),
]


@pytest.mark.parametrize("case", CASES + PIXEL_LOOP_CASES + UNIT_ROW_CASES + ROW_BLOCK_CASES, ids=str)
def test_float64_parity(case, forced):
    x, w, b, dy = _tensors(case)
    _check_memory(case, x, w)
    saved = [(t.clone(), t.stride(), t.storage_offset()) for t in (x, w, b, dy) if t is not None]
    xx, ww, bb = _leaves(x, w, b)
    wrt = [t for t in (xx, ww, bb) if t is not None]
    with Ran() as fwd:
        out = ours(case, xx, ww, bb)
    with Ran() as bwd:
        grads = torch.autograd.grad(out, wrt, dy)
    assert case.forward_in_domain
    assert_ran(fwd, forced, 1, f"{case}: forward")
    if case.backward_in_domain:
        assert_ran(bwd, forced, case.backward_calls, f"{case}: backward")
    else:
        assert bwd.total == case.backward_calls, bwd.delta
    (want, want_grads), (mag, mag_grads) = reference(case, x, w, b, dy)
    assert_close64(out.detach(), want, mag, f"{case}: output")
    names = ["input", "weight", "bias"][: len(wrt)]
    for name, got, expect, m in zip(names, grads, want_grads, mag_grads):
        assert_close64(got, expect, m, f"{case}: grad {name}")
    for (values, stride, offset), after in zip(saved, (t for t in (x, w, b, dy) if t is not None)):
        assert torch.equal(values, after) and (stride, offset) == (after.stride(), after.storage_offset()), \
            f"{case}: an input changed"


# Channels per group at the domain's edge: 16 (in), 17 (out: values only, on whatever path runs).
BOUNDARY = [
    Case(op, f"g{cpg}", 2, 2 * cpg, 2 * out_g, 2, size, k, s, p, (1,) * len(size), opad, bias=True, fmt=fmt)
    for op in OPS
    for cpg, out_g in ((16, 1), (17, 2))
    for size, k, s, p, fmt, opad in (((9,), (3,), (2,), (1,), "contiguous", (1,)),
                                     ((6, 5), (3, 2), (1, 2), (1, 0), "channels_last", (0, 1)))
]


@pytest.mark.parametrize("case", BOUNDARY, ids=str)
def test_float64_parity_at_the_domain_edge(case, forced):
    x, w, b, dy = _tensors(case)
    xx, ww, bb = _leaves(x, w, b)
    with Ran() as fwd:
        out = ours(case, xx, ww, bb)
    with Ran() as bwd:
        grads = torch.autograd.grad(out, [xx, ww, bb], dy)
    if case.forward_in_domain:
        assert_ran(fwd, forced, 1, f"{case}: forward")
    else:
        assert fwd.total == 1 and (fwd[DW] == 0 or forced != DW), fwd.delta
    assert bwd.total == case.backward_calls, bwd.delta
    (want, want_grads), (mag, mag_grads) = reference(case, x, w, b, dy)
    assert_close64(out.detach(), want, mag, f"{case}: output")
    for name, got, expect, m in zip(("input", "weight", "bias"), grads, want_grads, mag_grads):
        assert_close64(got, expect, m, f"{case}: grad {name}")


# ------------------------------------------------------------------ 2. float32, bfloat16, float16 forward


def _dtype_cases():
    r = random.Random(77)
    cases = []
    for op in OPS:
        for dims in (1, 2, 3):
            for i, (kind, fmt) in enumerate((("dw1", "channels_last"), ("dw2", "contiguous"), ("g4", "sliced"))):
                if dims == 1 and fmt == "channels_last":
                    fmt = "contiguous"
                cases.append(_draw(r, op, dims, kind, fmt, i))
    return cases


DTYPE_CASES = _dtype_cases()
# |error| <= rel * (the float64 op on |x|, |w|, |b|), elementwise: float32 from its
# worst-case sum (case.reduction * eps); bfloat16 and float16 for the output's rounding
# (half an ulp: up to 2^-8 and 2^-11 of the value) with margin for a float32 sum.
LOW_REL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", DTYPE_CASES + UNIT_ROW_CASES + ROW_BLOCK_CASES, ids=str)
def test_low_precision_forward(case, dtype, forced):
    x, w, b, _ = _tensors(case, dtype)
    with Ran() as ran:
        out = ours(case, x, w, b)
    assert_ran(ran, forced, 1, f"{case} {dtype}")
    assert out.dtype == dtype
    # the exact result of the dtype-rounded inputs, and its magnitudes
    up = lambda t: None if t is None else t.double()  # noqa: E731
    absolute = lambda t: None if t is None else t.double().abs()  # noqa: E731
    want = theirs(case, up(x), up(w), up(b))
    mag = theirs(case, absolute(x), absolute(w), absolute(b))
    rel = case.reduction * EPS32 if dtype == torch.float32 else LOW_REL[dtype]
    floor = 1e-3 * torch.finfo(dtype).eps * _scale(mag)
    assert_within(out, want, mag, rel, f"{case} {dtype}", floor)


# ------------------------------------------------------------------ 3. gradcheck and gradgradcheck


def test_gradcheck_conv2d_depthwise(forced):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 1, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)  # multiplier 2
    b = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    fn = lambda x, w, b: CF.conv2d(x, w, b, 2, 1, 1, 2)  # noqa: E731
    with Ran() as ran:
        assert gradcheck(fn, (x, w, b))
        assert gradgradcheck(fn, (x, w, b))
    assert ran[forced] > 0 and ran[forced] == ran.total, ran.delta


def test_gradcheck_conv_transpose2d_depthwise(forced):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 2, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 2, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)  # groups 2: multiplier 2
    b = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    fn = lambda x, w, b: CF.conv_transpose2d(x, w, b, 2, 1, 1, 2, 1)  # noqa: E731
    with Ran() as ran:
        assert gradcheck(fn, (x, w, b))
        assert gradgradcheck(fn, (x, w, b))
    assert ran[forced] > 0 and ran[forced] == ran.total, ran.delta


# ------------------------------------------------------------------ 4. the same bits at any thread count


THREAD_CASES = [
    Case("conv", "dw1", 2, 64, 64, 64, (20, 20), (3, 3), (1, 1), (1, 1), (1, 1), fmt="contiguous"),
    Case("conv", "dw1", 2, 64, 64, 64, (20, 20), (3, 3), (1, 1), (1, 1), (1, 1), fmt="channels_last"),
    Case("conv_transpose", "dw1", 2, 64, 64, 64, (10, 10), (3, 3), (2, 2), (1, 1), (1, 1), (1, 1), fmt="contiguous"),
    # The pixel loops' weight gradient in several stretches of rows, summed in order
    # (kWeightStretchWork in depthwise_cpu.cpp: n * out pixels * taps * channels = 2 * 40 * 40 * 9 * 64
    # is 3.5 times 2^19, so 4 stretches), and its output rows in stretches of pixels.
    Case("conv", "dw1", 2, 64, 64, 64, (40, 40), (3, 3), (1, 1), (1, 1), (1, 1), fmt="channels_last"),
]


@pytest.mark.parametrize("case", THREAD_CASES, ids=str)
def test_bitwise_the_same_at_any_thread_count(case, forced, threads):
    x, w, b, dy = _tensors(case, torch.float32)
    results = {}
    for n in (1, 2, 3, 4):
        torch.set_num_threads(n)
        xx, ww, bb = _leaves(x, w, b)
        with Ran() as ran:
            out = ours(case, xx, ww, bb)
            grads = torch.autograd.grad(out, [xx, ww, bb], dy)
        assert_ran(ran, forced, 1 + case.backward_calls, f"{case} at {n} threads")
        results[n] = [out.detach(), *grads]
    for n in (2, 3, 4):
        for name, one, many in zip(("output", "grad input", "grad weight", "grad bias"), results[1], results[n]):
            assert torch.equal(one, many), f"{case}: {name} at {n} threads differs from 1 thread"
    # and right: each gradient within the rounding of its sums (the input's over the taps,
    # the weight's over every output position, the bias's too)
    (want, want_grads), (mag, mag_grads) = reference(case, x, w, b, dy)
    assert_within(results[1][0], want, mag, case.reduction * EPS32, f"{case}: output")
    positions = case.n * math.prod(want.shape[2:])
    for name, got, expect, m, terms in zip(("grad input", "grad weight", "grad bias"), results[1][1:], want_grads,
                                           mag_grads, (case.reduction, positions, positions)):
        assert_within(got, expect, m, terms * EPS32, f"{case}: {name}")


# ------------------------------------------------------------------ 5. edge cases


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("op", OPS)
def test_empty_batch(op, dims, forced):
    case = Case(op, "dw2", 0, 4, 8, 4, (5,) * dims, (3,) * dims, (2,) * dims, (1,) * dims, (1,) * dims,
                (1,) * dims if op == "conv_transpose" else None)
    gen = torch.Generator().manual_seed(dims)
    x = torch.randn(0, 4, *case.size, generator=gen, dtype=torch.float64)
    w = torch.randn(*case.weight_shape, generator=gen, dtype=torch.float64)
    b = torch.randn(8, generator=gen, dtype=torch.float64)
    xx, ww, bb = _leaves(x, w, b)
    out = ours(case, xx, ww, bb)
    want = theirs(case, x, w, b)
    assert out.shape == want.shape == (0, 8, *case.out_size)
    gx, gw, gb = torch.autograd.grad(out, [xx, ww, bb], torch.randn(out.shape, dtype=torch.float64))
    assert gx.shape == x.shape
    assert gw.shape == w.shape and torch.equal(gw, torch.zeros_like(w))
    assert gb.shape == b.shape and torch.equal(gb, torch.zeros_like(b))


def _format_flags(t, dims):
    return t.is_contiguous(), t.is_contiguous(memory_format=CL[dims])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("op", OPS)
def test_output_memory_format_follows_torch(op, dims, dtype, forced):
    """With a channels_last(_3d) input, the output and the gradients are in the
    memory format torch gives them."""
    case = Case(op, "dw2", 2, 6, 12, 6, (7,) * dims, (3,) * dims, (2,) * dims, (1,) * dims, (1,) * dims,
                (1,) * dims if op == "conv_transpose" else None, fmt="channels_last")
    x, w, b, dy = _tensors(case, dtype)
    results = []
    for fn in (ours, theirs):
        xx, ww, bb = _leaves(x, w, b)
        out = fn(case, xx, ww, bb)
        grads = torch.autograd.grad(out, [xx, ww], dy)
        results.append([out, *grads])
    for name, got, want in zip(("output", "grad input", "grad weight"), *results):
        assert _format_flags(got, dims) == _format_flags(want, dims), (name, got.stride(), want.stride())
    # (torch 2.x gives channels_last here except for float64 in 3-d, whose output is contiguous: both kinds are checked)


def test_auto_matches_torch_on_a_mobilenet_layer():
    case = Case("conv", "dw1", 2, 32, 32, 32, (17, 17), (3, 3), (2, 2), (1, 1), (1, 1), fmt="contiguous")
    x, w, b, dy = _tensors(case, torch.float32)
    with conv_path("auto"):
        xx, ww, bb = _leaves(x, w, b)
        out = ours(case, xx, ww, bb)
        grads = torch.autograd.grad(out, [xx, ww, bb], dy)
    (want, want_grads), (mag, mag_grads) = reference(case, x, w, b, dy)
    assert_within(out, want, mag, case.reduction * EPS32, "auto: output")
    lengths = (case.out_per_group * 9, case.n * math.prod(case.out_size), case.n * math.prod(case.out_size))
    for name, got, expect, m, length in zip(("input", "weight", "bias"), grads, want_grads, mag_grads, lengths):
        assert_within(got, expect, m, length * EPS32, f"auto: grad {name}")


def test_auto_runs_depthwise_on_a_mobilenet_layer():
    """The rule picks the depthwise path for a depthwise float32 layer with multiplier 1."""
    gen = torch.Generator().manual_seed(32)
    x = torch.randn(2, 32, 17, 17, generator=gen)
    w = torch.randn(32, 1, 3, 3, generator=gen)
    before = calls()
    with conv_path("auto"), Ran() as ran:
        CF.conv2d(x, w, None, 2, 1, 1, 32)
    assert calls() - before == 1, f"auto did not run the depthwise path on a MobileNet layer: {ran.delta}"
    assert_ran(ran, DW, 1, "auto, a MobileNet depthwise layer")


@pytest.mark.parametrize("module", ["Conv2d", "ConvTranspose2d"])
def test_modules(module, forced):
    """convt_ext.nn's modules with torch's parameters give torch's outputs and gradients."""
    torch.manual_seed(9)
    kwargs = dict(kernel_size=3, stride=2, padding=1, groups=8, dtype=torch.float64)
    if module == "ConvTranspose2d":
        kwargs["output_padding"] = 1
    theirs_m = getattr(torch.nn, module)(8, 16, **kwargs)
    ours_m = getattr(convt_ext.nn, module)(8, 16, **kwargs)
    ours_m.load_state_dict(theirs_m.state_dict())
    x = torch.randn(3, 8, 9, 7, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    with Ran() as ran:
        out = ours_m(x)
    assert_ran(ran, forced, 1, module)
    want = theirs_m(x)
    dy = torch.randn_like(want)
    got = torch.autograd.grad(out, list(ours_m.parameters()), dy)
    expect = torch.autograd.grad(want, list(theirs_m.parameters()), dy)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    for g, e in zip(got, expect):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-11)


# ------------------------------------------------------------------ 6. the same values on every path


PATH_CASES = [
    Case("conv", "dw1", 2, 16, 16, 16, (13, 11), (3, 3), (2, 2), (1, 1), (1, 1), fmt="channels_last"),
    Case("conv", "dw2", 2, 8, 16, 8, (12, 9), (3, 5), (1, 2), (1, 2), (1, 1)),
    Case("conv", "dw1", 3, 12, 12, 12, (40,), (5,), (1,), (4,), (2,), bias=False),
    Case("conv", "dw1", 1, 6, 6, 6, (5, 6, 7), (3, 3, 3), (1, 2, 1), (1, 1, 1), (1, 1, 1), fmt="channels_last"),
    Case("conv_transpose", "dw1", 2, 16, 16, 16, (7, 8), (4, 4), (2, 2), (1, 1), (1, 1), (0, 1), fmt="channels_last"),
    Case("conv_transpose", "dw3", 2, 4, 12, 4, (9,), (3,), (3,), (1,), (1,), (2,)),
]


@pytest.mark.parametrize("case", PATH_CASES, ids=str)
def test_every_path_agrees_with_torch(case):
    x, w, b, _ = _tensors(case, torch.float32)
    up = lambda t: None if t is None else t.double()  # noqa: E731
    absolute = lambda t: None if t is None else t.double().abs()  # noqa: E731
    want = theirs(case, up(x), up(w), up(b))
    mag = theirs(case, absolute(x), absolute(w), absolute(b))
    outs = {}
    for setting in ("depthwise", "columns", "auto"):
        with (forced_path() if setting == "depthwise" else conv_path(setting)) as key, Ran() as ran:
            outs[setting] = ours(case, x, w, b)
        if setting == "depthwise":
            assert_ran(ran, key, 1, f"{case} forced")
        elif setting == "columns":
            assert_ran(ran, "columns", 1, f"{case} columns")
        assert_within(outs[setting], want, mag, case.reduction * EPS32, f"{case} on {setting!r}")
    for setting in ("columns", "auto"):
        assert_within(outs[setting], outs["depthwise"].double(), mag, 2 * case.reduction * EPS32,
                      f"{case}: {setting!r} against 'depthwise'")


# ------------------------------------------------------------------ the case table itself


def test_the_case_table_covers_what_it_claims():
    """Every (op, dims, format, kind) has cases; each op and dims sees every
    stride, both dilations, zero and wide padding, both batches, with and
    without bias; 2-d and 3-d see per-dimension strides; conv_transpose sees
    output_padding, also at or past the stride (where the dilation allows)."""
    tally = _tally(CASES)
    assert 150 <= len(CASES) <= 300, len(CASES)
    for op in OPS:
        for dims in (1, 2, 3):
            for fmt in _formats(dims):
                group = [c for c in CASES if (c.op, c.dims, c.fmt) == (op, dims, fmt)]
                assert tally[(op, dims, fmt)] == len(group) >= 10
                assert {c.kind for c in group} == set(KINDS), (op, dims, fmt)
            group = [c for c in CASES if (c.op, c.dims) == (op, dims)]
            every = lambda attr: {v for c in group for v in getattr(c, attr)}  # noqa: E731
            assert every("stride") == {1, 2, 3}, (op, dims)
            assert every("dilation") == {1, 2}, (op, dims)
            assert 0 in every("padding")
            assert any(p > k // 2 for c in group for p, k in zip(c.padding, c.kernel)), (op, dims)
            assert any(n % 2 == 1 and n > 1 for c in group for n in c.size), (op, dims)  # odd sizes
            assert {c.n for c in group} == {1, 3}
            assert {c.bias for c in group} == {True, False}
            assert {c.out_per_group for c in group if c.kind.startswith("dw")} == {1, 2, 3}
            assert {c.in_per_group for c in group if c.kind.startswith("g")} == {2, 4}
            if dims > 1:
                assert any(len(set(c.stride)) > 1 for c in group), (op, dims)
                assert any(c.weight_cl for c in group)
            if op == "conv_transpose":
                assert any(any(c.output_padding) for c in group), dims
                assert any(o >= s for c in group for o, s in zip(c.output_padding, c.stride)), dims
                assert all(o < max(s, d) for c in group for o, s, d in zip(c.output_padding, c.stride, c.dilation))
    assert all(c.n >= 1 and min(c.out_size) >= 1 for c in CASES)
    assert all(c.forward_in_domain and c.backward_in_domain for c in CASES)
    assert {c.in_per_group for c in BOUNDARY} == {LIMIT, LIMIT + 1}


if __name__ == "__main__":  # the case table: python tests/test_depthwise.py
    for c in CASES:
        print(c)
    for key, count in sorted(_tally(CASES).items()):
        print(*key, count)
    print("total", len(CASES))


@pytest.mark.parametrize("op,cuda,avx512,pixels,ci,cw,wins", [
    # The CPU's vector loops: one channel per group on both sides, every op, every build, both formats ...
    *((op, False, wide, px, 1, 1, True) for op in ("conv", "conv_transpose", "conv_weight", "conv_transpose_backward")
      for wide in (True, False) for px in (True, False)),
    # ... with AVX-512, up to 16 channels per group on both sides in planar memory (multipliers up to 16
    # among them) ...
    *((op, False, True, False, ci, cw, True) for op, ci, cw in (
        ("conv", 4, 4), ("conv", 2, 3), ("conv", 1, 8), ("conv_transpose", 8, 1), ("conv_weight", 4, 2),
        ("conv", 8, 8), ("conv_transpose", 5, 8), ("conv_transpose_backward", 8, 8), ("conv", 16, 16),
        ("conv_transpose", 12, 12), ("conv_weight", 16, 16), ("conv_transpose_backward", 1, 16))),
    # ... and in pixel memory up to 15, or 16 on one side alone: at 16 on both the view path wins ...
    *((op, False, True, True, ci, cw, wins) for op, ci, cw, wins in (
        ("conv", 8, 8, True), ("conv", 12, 12, True), ("conv_transpose", 15, 15, True), ("conv_weight", 1, 16, True),
        ("conv", 16, 8, True), ("conv", 16, 16, False), ("conv_transpose", 16, 16, False),
        ("conv_transpose_backward", 16, 16, False))),
    # ... beyond which the GEMM paths win;
    *((op, False, True, px, ci, cw, False) for px in (True, False) for op, ci, cw in (
        ("conv", 17, 8), ("conv", 1, 17), ("conv_transpose", 32, 32), ("conv_weight", 2, 17))),
    # without AVX-512 the GEMM paths win from a second channel on either side.
    *((op, False, False, px, ci, cw, False) for px in (True, False) for op, ci, cw in (
        ("conv", 2, 2), ("conv", 1, 2), ("conv_transpose", 2, 1), ("conv_weight", 4, 4),
        ("conv_transpose_backward", 8, 8))),
    # A GPU: forward ops with one channel per group on the summed side; never the weight gradient.
    *((op, True, wide, False, ci, cw, wins) for wide in (True, False) for op, ci, cw, wins in (
        ("conv", 1, 3, True), ("conv", 2, 1, False), ("conv_transpose", 3, 1, True),
        ("conv_transpose", 1, 2, False), ("conv_weight", 1, 1, False), ("conv_transpose_backward", 1, 1, False))),
])
def test_depthwise_rule_table(op, cuda, avx512, pixels, ci, cw, wins):
    """The "auto" rule of the depthwise path as a table (csrc/conv/depthwise.cpp)."""
    assert convt_ext._C.depthwise_rule(op, cuda, avx512, pixels, ci, cw) is wins


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("ci,cw", [(1, 1), (4, 4), (8, 8), (1, 2), (12, 12), (16, 16)])
def test_auto_follows_the_loops_build(ci, cw, fmt):
    """On this machine "auto" runs the depthwise path on a float32 grouped layer exactly where
    the rule says for the vector loops' build here and the input's format (.ci/run's capped
    stages run the other branch)."""
    groups = 4
    x = torch.randn(1, groups * ci, 6, 6)
    w = torch.randn(groups * cw, ci, 3, 3)
    pixels = fmt == "channels_last"
    if pixels:
        x = x.contiguous(memory_format=torch.channels_last)
    wide = convt_ext.engine_info()["path"]["depthwise_isa"] == "avx512"
    before = calls()
    with conv_path("auto"):
        got = CF.conv2d(x, w, None, 1, 1, 1, groups)
    want = torch.nn.functional.conv2d(x.double(), w.double(), None, 1, 1, 1, groups)
    assert_within(got, want, torch.nn.functional.conv2d(x.double().abs(), w.double().abs(), None, 1, 1, 1, groups),
                  (ci * 9 + 1) * EPS32, f"auto at {ci}/{cw} channels per group, {fmt}")
    assert (calls() - before == 1) is convt_ext._C.depthwise_rule("conv", False, wide, pixels, ci, cw)


def test_depthwise_loops_follow_the_cpu_capability():
    """The vector loops' build follows torch's capability (capped by ATEN_CPU_CAPABILITY,
    which .ci/run sets to run the other builds)."""
    cap = torch.backends.cpu.get_cpu_capability()
    isa = convt_ext.engine_info()["path"]["depthwise_isa"]
    assert isa == {"AVX512": "avx512", "AVX2": "avx2"}.get(cap, "default") or (cap == "AVX512" and isa == "avx2")


def _vector_loop_cases():
    """Depthwise layers with multiplier 1, the CPU's vector loops (pixel memory and planar):
    random strides, padding (up to beyond the kernel), dilation and output_padding in 1-3 d,
    channel counts on both sides of a vector (8 doubles), batch 1-2, never empty."""
    rnd = random.Random(2912)
    cases = []
    for i in range(72):
        d = (1, 2, 3)[i % 3]
        k = [rnd.randint(1, 5 if d < 3 else 3) for _ in range(d)]
        dil = [rnd.randint(1, 2) for _ in range(d)]
        stride = [rnd.randint(1, 3) for _ in range(d)]
        pad = [rnd.randint(0, dil[j] * (k[j] - 1) + 1) for j in range(d)]
        size = [rnd.randint(max(1, dil[j] * (k[j] - 1) + 1 - 2 * pad[j]), 7 if d == 3 else 13) for j in range(d)]
        channels = (3, 8, 19, 40)[i % 4]
        channels_last = d > 1 and (i // 3) % 2 == 1
        cases.append((d, 1 + i % 2, channels, size, k, dil, pad, stride, channels_last))
    return cases


VECTOR_LOOP_CASES = _vector_loop_cases()


def test_vector_loop_cases_cover_both_layouts_and_every_dimension():
    assert {(c[0], c[8]) for c in VECTOR_LOOP_CASES} == {(1, False), (2, False), (2, True), (3, False), (3, True)}
    assert any(max(c[7]) > 1 for c in VECTOR_LOOP_CASES if c[8]) and any(max(c[7]) > 1 for c in VECTOR_LOOP_CASES if not c[8])
    assert all(c[1] > 0 for c in VECTOR_LOOP_CASES)


@pytest.mark.parametrize("case", VECTOR_LOOP_CASES, ids=lambda c: f"{c[0]}d-n{c[1]}-c{c[2]}-s{c[7]}-{'cl' if c[8] else 'planar'}")
def test_vector_loops_match_torch(case):
    """conv, conv_transpose (with the output_padding that gives back the input's shape) and
    every gradient of both, on the depthwise path in float64, against torch."""
    d, n, c, size, k, dil, pad, stride, channels_last = case
    g = torch.Generator().manual_seed(VECTOR_LOOP_CASES.index(case))
    fmt = {2: torch.channels_last, 3: torch.channels_last_3d}.get(d) if channels_last else torch.contiguous_format
    x = torch.randn(n, c, *size, dtype=torch.float64, generator=g).to(memory_format=fmt)
    w = torch.randn(c, 1, *k, dtype=torch.float64, generator=g)
    b = torch.randn(c, dtype=torch.float64, generator=g)
    conv = (F.conv1d, F.conv2d, F.conv3d)[d - 1]
    conv_t = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[d - 1]
    ours, ours_t = (getattr(CF, f"conv{d}d"), getattr(CF, f"conv_transpose{d}d"))
    adj = [(size[j] + 2 * pad[j] - dil[j] * (k[j] - 1) - 1) % stride[j] for j in range(d)]
    y_ref = conv(x, w, b, stride, pad, dil, c)
    dy = torch.randn(y_ref.shape, dtype=torch.float64, generator=g).to(memory_format=fmt)
    for direct in (True, False):
        leaves = [(x if direct else dy).clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()]
        if direct:
            want_fn = lambda a, ww, bb: conv(a, ww, bb, stride, pad, dil, c)  # noqa: E731
            got_fn = lambda a, ww, bb: ours(a, ww, bb, stride, pad, dil, c)  # noqa: E731
        else:
            want_fn = lambda a, ww, bb: conv_t(a, ww, bb, stride, pad, adj, c, dil)  # noqa: E731
            got_fn = lambda a, ww, bb: ours_t(a, ww, bb, stride, pad, adj, c, dil)  # noqa: E731
        want = want_fn(*leaves)
        upstream = torch.randn(want.shape, dtype=torch.float64, generator=g)
        want_grads = torch.autograd.grad(want, leaves, upstream)
        with forced_path(), Ran() as ran:
            got = got_fn(*leaves)
            got_grads = torch.autograd.grad(got, leaves, upstream)
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)
        for a, e in zip(got_grads, want_grads):
            torch.testing.assert_close(a, e, rtol=1e-11, atol=1e-10)
        assert ran[DW] >= 2 and ran.total == ran[DW], ran.delta  # forward, then the backward op(s)


# ------------------------------------------------------------------ 7. blocked planes (planar depthwise conv)


def loops():
    """How often each of the depthwise path's CPU loops ran so far."""
    return dict(convt_ext.engine_info()["path"]["depthwise_loops"])


def _blocked_plane_cases():
    """Planar depthwise convs that the rule sends to blocked planes: kernel width 3, 5 or
    7 with stride 1 or 2 and dilation 1 along the last dimension, anything along the
    others, padding up to beyond the kernel, rows shorter and longer than a vector and
    than a block of 8-10 pixels, at least 4 (sample, block of 32 channels) tasks, and
    channel counts that leave a short block (5, 33, 70) or none (32); never empty."""
    rnd = random.Random(712)
    cases = []
    for i in range(36):
        d = (1, 2, 3)[i % 3]
        k = [rnd.randint(1, 3) for _ in range(d - 1)] + [(3, 5, 7)[i % 3 if d == 1 else rnd.randint(0, 2)]]
        dil = [rnd.randint(1, 2) for _ in range(d - 1)] + [1]
        stride = [rnd.randint(1, 2) for _ in range(d)]
        pad = [rnd.randint(0, dil[j] * (k[j] - 1) + 1) for j in range(d)]
        top = [5 if d == 3 else 9] * (d - 1) + [23]
        # At least 2 pixels along a row: (N, C, 1) is pixel memory too, and takes that loop.
        size = [rnd.randint(max(2 if j == d - 1 else 1, dil[j] * (k[j] - 1) + 1 - 2 * pad[j]), top[j]) for j in range(d)]
        c = (5, 32, 33, 70)[i % 4]
        n = 2 if c > 64 else 4 + i % 2
        cases.append((d, n, c, size, k, dil, pad, stride, bool(i % 2)))
    return cases


BLOCKED_PLANE_CASES = _blocked_plane_cases()


@pytest.mark.parametrize("case", BLOCKED_PLANE_CASES, ids=lambda c: f"{c[0]}d-n{c[1]}-c{c[2]}-{c[3]}-k{c[4]}-s{c[7]}")
def test_blocked_planes_match_torch(case, forced, threads, no_plane_rows):
    """float64 values and weight gradients against torch's, with and without bias, on the
    blocked-plane loops (counted), and the same bits at 1 and 3 threads."""
    d, n, c, size, k, dil, pad, stride, bias = case
    g = torch.Generator().manual_seed(BLOCKED_PLANE_CASES.index(case))
    x = torch.randn(n, c, *size, dtype=torch.float64, generator=g)
    w = torch.randn(c, 1, *k, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(c, dtype=torch.float64, generator=g) if bias else None
    want = (F.conv1d, F.conv2d, F.conv3d)[d - 1](x, w, b, stride, pad, dil, c)
    upstream = torch.randn(want.shape, dtype=torch.float64, generator=g)
    (want_dw,) = torch.autograd.grad(want, [w], upstream)
    ours = getattr(CF, f"conv{d}d")
    before = loops()
    results = []
    for threads_now in (1, 3):
        torch.set_num_threads(threads_now)
        got = ours(x, w, b, stride, pad, dil, c)
        results.append((got, *torch.autograd.grad(got, [w], upstream)))
    after = loops()
    ran = (after["blocked_planes"] - before["blocked_planes"], after["weight_blocked_planes"] - before["weight_blocked_planes"])
    assert ran == (2, 2), (ran, after)
    (got, got_dw), (again, again_dw) = results
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(got_dw, want_dw, rtol=1e-11, atol=1e-10)
    assert torch.equal(got, again) and torch.equal(got_dw, again_dw)
    assert got.is_contiguous()


def _low_precision_on(loop, dtype, size, c, m, stride, taken=True):
    """A 3x3 planar depthwise conv (c channels, multiplier m, padding 1) in `dtype` against
    torch's float64 result on the same values, counted on `loop` where `taken`."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(size[0], c, *size[1:], generator=g).to(dtype)
    w = torch.randn(c * m, 1, 3, 3, generator=g).to(dtype)
    b = torch.randn(c * m, generator=g).to(dtype)
    want = F.conv2d(x.double(), w.double(), b.double(), stride, 1, 1, c)
    before = loops()[loop]
    got = CF.conv2d(x, w, b, stride, 1, 1, c)
    assert loops()[loop] - before == int(taken)
    assert got.dtype == dtype
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_blocked_planes_low_precision(dtype, forced, no_plane_rows):
    """float32 and bfloat16 (summed in float32) on the blocked-plane loop."""
    _low_precision_on("blocked_planes", dtype, (4, 10, 10), 70, 1, 2)


@pytest.mark.parametrize("n,c,hw,k,stride,blocked", [
    (4, 96, 10, 3, 1, True),      # MobileNet's small planes
    (8, 96, 80, 3, 2, True),      # stride 2 up to 80x80: its buffers fit the L2
    (1, 32, 112, 3, 1, False),    # beyond the L2: phase planes
    (1, 96, 10, 3, 1, False),     # 3 tasks: phase planes split by channel
    (2, 64, 10, 3, 1, True),      # 4 tasks
    (4, 32, 10, 4, 1, False),     # no block for a width of 4
    (4, 32, 10, 3, 3, False),     # nor for stride 3
])
def test_blocked_planes_rule(n, c, hw, k, stride, blocked, forced, no_plane_rows):
    """Which planar loop a depthwise conv takes, by the rule in cpu/depthwise_cpu.cpp, and
    its values either way."""
    g = torch.Generator().manual_seed(n * c + hw)
    x = torch.randn(n, c, hw, hw, dtype=torch.float64, generator=g)
    w = torch.randn(c, 1, k, k, dtype=torch.float64, generator=g)
    before = loops()
    got = CF.conv2d(x, w, None, stride, 1, 1, c)
    after = loops()
    assert (after["blocked_planes"] - before["blocked_planes"], after["phase_planes"] - before["phase_planes"]) == (
        (1, 0) if blocked else (0, 1)
    )
    torch.testing.assert_close(got, F.conv2d(x, w, None, stride, 1, 1, c), rtol=1e-11, atol=1e-11)


def test_blocked_plane_cases_cover_what_they_claim():
    cases = BLOCKED_PLANE_CASES
    assert {c[0] for c in cases} == {1, 2, 3} and all(c[1] > 0 for c in cases)
    assert {c[4][-1] for c in cases} == {3, 5, 7} and {c[7][-1] for c in cases} == {1, 2}
    assert {c[2] % 32 == 0 for c in cases} == {True, False}
    assert any(c[3][-1] > 16 for c in cases) and any(c[3][-1] < 8 for c in cases)
    assert all(c[1] * -(-c[2] // 32) >= 4 for c in cases)


def _transpose_args(case):
    """A blocked-plane case's output_padding (drawn below its stride or dilation) and
    padding for conv_transpose: the case's, lowered where the output would be empty."""
    d, _, _, size, k, dil, pad, stride, _ = case
    rnd = random.Random(BLOCKED_PLANE_CASES.index(case))
    op = [rnd.randint(0, max(stride[j], dil[j]) - 1) for j in range(d)]
    pad = [min(pad[j], ((size[j] - 1) * stride[j] + dil[j] * (k[j] - 1) + op[j]) // 2) for j in range(d)]
    return op, pad


@pytest.mark.parametrize("case", BLOCKED_PLANE_CASES, ids=lambda c: f"{c[0]}d-n{c[1]}-c{c[2]}-{c[3]}-k{c[4]}-s{c[7]}")
def test_blocked_planes_run_conv_transpose_as_a_direct_conv(case, forced, threads, no_plane_rows):
    """conv_transpose (every output_padding its stride and dilation allow, drawn) as the
    guide's direct conv on blocked planes: counted on that loop wherever the padding
    d(k - 1) - p is not negative, on output phases elsewhere; float64 values against
    torch's, the same bits at 1 and 3 threads."""
    d, n, c, size, k, dil, _, stride, bias = case
    g = torch.Generator().manual_seed(100 + BLOCKED_PLANE_CASES.index(case))
    op, pad = _transpose_args(case)
    x = torch.randn(n, c, *size, dtype=torch.float64, generator=g)
    w = torch.randn(c, 1, *k, dtype=torch.float64, generator=g)
    b = torch.randn(c, dtype=torch.float64, generator=g) if bias else None
    want = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[d - 1](x, w, b, stride, pad, op, c, dil)
    ours = getattr(CF, f"conv_transpose{d}d")
    direct = all(pad[j] <= dil[j] * (k[j] - 1) for j in range(d))
    before = loops()
    torch.set_num_threads(1)
    got = ours(x, w, b, stride, pad, op, c, dil)
    torch.set_num_threads(3)
    again = ours(x, w, b, stride, pad, op, c, dil)
    after = loops()
    ran = (after["blocked_planes"] - before["blocked_planes"], after["output_phases"] - before["output_phases"])
    assert ran == ((2, 0) if direct else (0, 2)), (ran, direct)
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)
    assert torch.equal(got, again)


def test_blocked_plane_cases_reach_both_conv_transpose_loops():
    direct = [all(_transpose_args(c)[1][j] <= c[5][j] * (c[4][j] - 1) for j in range(c[0])) for c in BLOCKED_PLANE_CASES]
    assert sum(direct) >= 10 and not all(direct)
    assert any(max(c[7]) > 1 for c, dr in zip(BLOCKED_PLANE_CASES, direct) if dr)


# ------------------------------------------------------------------ 8. plane rows (planar depthwise conv, masked lanes)


def _plane_rows_taken(k2, s2, dil2, width, k1=None, s1=None, ci=1):
    """Whether the rule in cpu/depthwise_cpu.cpp (by_plane_rows) sends a planar conv to
    plane rows, on this process's build of the loops."""
    isa = convt_ext.engine_info()["path"]["depthwise_isa"]
    square = k1 is not None and k1 == k2 and s1 == s2  # 2-d and 3-d alone
    if isa == "default" or dil2 != 1 or k2 not in (3, 5) or s2 not in (1, 2) or not square or width < 12:
        return False
    if isa == "avx2":
        return s2 == 1 and k2 == 3
    return s2 == 1 or ci == 1


def _plane_row_cases():
    """Planar grouped convs (1, 2, 4 or 8 input channels per group, 1-3 times as many
    output channels) around plane rows' rule: kernel width 3, 5 or 7 as tall as it is wide
    (2-d, 3-d; 1-d, which the rule leaves to blocked planes), stride 1 or 2 both ways,
    dilation 1 along the rows and 1-2 along the third dimension, padding up to beyond the kernel, output rows of 12 to 40 pixels (one
    vector of floats and a part, up to three), batch 1-2; never empty."""
    rnd = random.Random(3101)
    cases = []
    for i in range(30):
        d = (1, 2, 3)[i % 3]
        k2 = (3, 5, 7)[(i // 3) % 3]
        s = (1, 2)[(i // 9) % 2] if i < 18 else rnd.randint(1, 2)
        k = ([rnd.randint(1, 2)] if d == 3 else []) + ([k2] if d > 1 else []) + [k2]
        stride = ([rnd.randint(1, 2)] if d == 3 else []) + [s] * min(d, 2)
        dil = ([rnd.randint(1, 2)] if d == 3 else []) + [1] * min(d, 2)
        pad = [rnd.randint(0, k[j]) for j in range(d)]
        width = rnd.randint(12, 40)  # output pixels along a row
        size = []
        for j in range(d):
            # input pixels that give `width` outputs along the rows, a few rows elsewhere
            lo = dil[j] * (k[j] - 1) + 1 - 2 * pad[j]
            size.append(max(1, (width - 1) * stride[j] + lo) if j == d - 1 else rnd.randint(max(1, lo), max(lo, 6 if d == 3 else 20)))
        c, m = (3, 8, 17)[i % 3], (1, 1, 2, 3)[i % 4]
        ci = (1, 1, 2, 4, 8)[i % 5] if c < 17 else 1
        cases.append((d, 1 + i % 2, c, ci, m, size, k, dil, pad, stride, bool(i % 2)))
    return cases


PLANE_ROW_CASES = _plane_row_cases()


def _out_width(case):
    d, _, _, _, _, size, k, dil, pad, stride, _ = case
    return (size[-1] + 2 * pad[-1] - dil[-1] * (k[-1] - 1) - 1) // stride[-1] + 1


def test_plane_row_cases_cover_what_they_claim():
    cases = PLANE_ROW_CASES
    assert {c[0] for c in cases} == {1, 2, 3} and all(c[1] > 0 for c in cases)
    assert {c[6][-1] for c in cases} == {3, 5, 7} and {c[9][-1] for c in cases} == {1, 2}
    assert {c[3] for c in cases} == {1, 2, 4, 8} and {c[4] for c in cases} == {1, 2, 3}
    assert all(12 <= _out_width(c) <= 40 for c in cases)
    assert any(_out_width(c) > 32 for c in cases) and any(_out_width(c) <= 16 for c in cases)
    assert any(c[8][-1] > c[6][-1] // 2 for c in cases)  # padding past the half kernel


def _taken(case):
    d, ci, k, stride, dil = case[0], case[3], case[6], case[9], case[7]
    return _plane_rows_taken(k[-1], stride[-1], dil[-1], _out_width(case), *((k[-2], stride[-2]) if d > 1 else (None, None)),
                             ci=ci)


@pytest.mark.parametrize("case", PLANE_ROW_CASES, ids=lambda c: f"{c[0]}d-n{c[1]}-g{c[2]}-{c[3]}to{c[3] * c[4]}-{c[5]}-k{c[6]}-s{c[9]}")
def test_plane_rows_match_torch(case, forced, threads):
    """float64 values and input and weight gradients against torch's, with and without
    bias, the forward counted on plane rows where the rule says so (and on another loop
    where it does not), the same bits at 1 and 3 threads."""
    d, n, c, ci, m, size, k, dil, pad, stride, bias = case
    g = torch.Generator().manual_seed(PLANE_ROW_CASES.index(case))
    x = torch.randn(n, c * ci, *size, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(c * ci * m, ci, *k, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(c * ci * m, dtype=torch.float64, generator=g) if bias else None
    want = (F.conv1d, F.conv2d, F.conv3d)[d - 1](x, w, b, stride, pad, dil, c)
    upstream = torch.randn(want.shape, dtype=torch.float64, generator=g)
    want_grads = torch.autograd.grad(want, [x, w], upstream)
    ours = getattr(CF, f"conv{d}d")
    taken = _taken(case)
    results = []
    for threads_now in (1, 3):
        torch.set_num_threads(threads_now)
        before = loops()["plane_rows"]
        got = ours(x, w, b, stride, pad, dil, c)
        assert loops()["plane_rows"] - before == int(taken)
        results.append((got, *torch.autograd.grad(got, [x, w], upstream)))
    (got, gx, gw), again = results
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(gx, want_grads[0], rtol=1e-11, atol=1e-10)
    torch.testing.assert_close(gw, want_grads[1], rtol=1e-11, atol=1e-10)
    assert all(torch.equal(a, e) for a, e in zip(results[0], again))
    assert got.is_contiguous()


def test_plane_row_cases_reach_plane_rows():
    taken = [_taken(c) for c in PLANE_ROW_CASES]
    isa = convt_ext.engine_info()["path"]["depthwise_isa"]
    assert sum(taken) >= (10 if isa == "avx512" else 4 if isa == "avx2" else 0) and not all(taken)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_plane_rows_low_precision(dtype, forced):
    """float32, bfloat16 and float16 (summed in float32) on plane rows; stride 1, width 3,
    so every build with masked lanes takes it."""
    _low_precision_on("plane_rows", dtype, (2, 9, 30), 12, 2, 1, _plane_rows_taken(3, 1, 1, 30, 3, 1))


@pytest.mark.parametrize("hw,k,stride,dilation,kh,transposed", [
    (28, 3, 1, 1, 3, False),     # MobileNet's middle layers
    (14, 3, 1, 1, 3, False),     # one vector a row (8 rows a block)
    (12, 3, 1, 1, 3, False),     # the narrowest row it takes
    (10, 3, 1, 1, 3, False),     # narrower: blocked planes fill their vectors with channels
    (56, 3, 2, 1, 3, False),     # stride 2: AVX-512 only
    (56, 5, 1, 1, 5, False),     # 5x5: AVX-512 only
    (56, 7, 1, 1, 7, False),     # ConvNeXt's 7x7: blocked planes
    (28, 3, 1, 2, 3, False),     # dilation along the row: no
    (28, 4, 1, 1, 4, False),     # no instantiation for a width of 4
    (28, 3, 1, 1, 1, False),     # not square: no (nor 1-d: one row a plane)
    (28, 3, 1, 1, 3, True),      # conv_transpose at stride 1: the direct conv, on plane rows
    (28, 3, 2, 1, 3, True),      # at stride 2 the direct conv has zeros inserted: no
])
def test_plane_rows_rule(hw, k, stride, dilation, kh, transposed, forced):
    """Which loop a planar depthwise conv (64 channels, batch 2, padding 1) takes, by the
    rule in cpu/depthwise_cpu.cpp on this build of the loops, and its values either way."""
    g = torch.Generator().manual_seed(hw * k + stride)
    x = torch.randn(2, 64, hw, hw, dtype=torch.float64, generator=g)
    w = torch.randn(64, 1, kh, k, dtype=torch.float64, generator=g)
    width = (hw + 2 - dilation * (k - 1) - 1) // stride + 1
    if transposed:
        out_pad = stride - 1
        want = F.conv_transpose2d(x, w, None, stride, 1, out_pad, 64, dilation)
        width = want.shape[-1]
        # the direct conv's stride is 1 and its zeros inserted decide
        taken = stride == 1 and _plane_rows_taken(k, 1, dilation, width, kh, 1)
    else:
        want = F.conv2d(x, w, None, stride, 1, dilation, 64)
        taken = _plane_rows_taken(k, stride, dilation, width, kh, stride)
    before = loops()["plane_rows"]
    if transposed:
        got = CF.conv_transpose2d(x, w, None, stride, 1, stride - 1, 64, dilation)
    else:
        got = CF.conv2d(x, w, None, stride, 1, dilation, 64)
    assert loops()["plane_rows"] - before == int(taken)
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)


def test_plane_rows_rule_on_this_build():
    """The rule's table above takes plane rows on the rows it claims, on this build."""
    isa = convt_ext.engine_info()["path"]["depthwise_isa"]
    taken = [_plane_rows_taken(3, 1, 1, 28, 3, 1), _plane_rows_taken(3, 2, 1, 28, 3, 2), _plane_rows_taken(3, 1, 1, 10, 3, 1),
             _plane_rows_taken(3, 2, 1, 28, 3, 2, ci=2), _plane_rows_taken(7, 1, 1, 28, 7, 1)]
    assert taken == {"avx512": [True, True, False, False, False], "avx2": [True, False, False, False, False],
                     "default": [False] * 5}[isa]
