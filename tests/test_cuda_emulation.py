"""The CUDA kernels' per-element code (csrc/elements.h), run on the CPU.

torch.ops.convt_ext_emulated.im2col / .col2im (a test-only extension,
tests/emulated/emulate.cpp, built by tests/emulated_ops.py) run the very
functions that the __global__ kernels call, over their whole grid, with the
index type forced to int32 or int64. CI has no GPU, so this is where the
device logic (index decomposition, offsets, bounds, the window_at gather)
is checked: against F.unfold / F.fold in float64 and against the CPU loops.
"""
import random

import pytest
import torch
import torch.nn.functional as F

import convt_ext

from conftest import assert_same, make_tensor, random_of, u_col2im, u_im2col
from emulated_ops import emulated

ops = torch.ops.convt_ext


def _cases():
    rnd = random.Random(1234)
    cases = []
    for i in range(48):
        d = (1, 2, 3)[i % 3]
        k = [rnd.randint(1, 3) for _ in range(d)]
        dil = [rnd.randint(1, 3) for _ in range(d)]
        pad = [rnd.randint(0, 2) for _ in range(d)]
        stride = [rnd.randint(1, 3) for _ in range(d)]
        size = [rnd.randint(max(1, dil[j] * (k[j] - 1) + 1 - 2 * pad[j]), 7 if d == 3 else 9) for j in range(d)]
        batch = 1 + i % 3  # never empty: every case computes
        channels = rnd.randint(1, 3)
        layout = ("contiguous", "transposed", "sliced", "offset")[i % 4]
        cases.append((d, batch, channels, size, k, dil, pad, stride, layout))
    return cases


CASES = _cases()


def _reference_unfold(x, k, dil, pad, stride):
    """im2col by a one-hot convolution per channel, in float64: independent of convt_ext."""
    d = len(k)
    n, c = x.shape[:2]
    eye = torch.eye(int(torch.tensor(k).prod()), dtype=x.dtype).reshape(-1, 1, *k)
    conv = (F.conv1d, F.conv2d, F.conv3d)[d - 1]
    out = conv(x.reshape(n * c, 1, *x.shape[2:]), eye, None, stride, pad, dil)
    return out.reshape(n, c * eye.shape[0], -1)


def test_cases_compute_in_every_dimension():
    dims = {c[0] for c in CASES}
    assert dims == {1, 2, 3}
    assert all(c[1] > 0 for c in CASES)
    assert any(s > 1 for c in CASES for s in c[7]) and any(v > 1 for c in CASES for v in c[5])


@pytest.mark.parametrize("int32", [True, False], ids=["int32", "int64"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}d-{i}" for i, c in enumerate(CASES)])
def test_emulated_kernels_match_torch(case, int32, rng):
    d, batch, channels, size, k, dil, pad, stride, layout = case
    x = make_tensor((batch, channels, *size), rng, layout if d >= 2 else "contiguous")
    cols = emulated().im2col(x, k, dil, pad, stride, int32)
    expected = _reference_unfold(x, k, dil, pad, stride)
    torch.testing.assert_close(cols, expected, rtol=0, atol=0)
    torch.testing.assert_close(cols, convt_ext.im2col(x, tuple(k), tuple(dil), tuple(pad), tuple(stride)), rtol=0, atol=0)
    # col2im, the adjoint: <unfold(x), c> == <x, fold(c)>, and the CPU loops' sums bit for bit.
    c = make_tensor(expected.shape, rng, layout)
    image = emulated().col2im(c, size, k, dil, pad, stride, int32)
    x_ref = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(_reference_unfold(x_ref, k, dil, pad, stride), x_ref, c)
    torch.testing.assert_close(image, grad, rtol=1e-12, atol=1e-12)
    assert torch.equal(image, convt_ext.col2im(c, tuple(size), tuple(k), tuple(dil), tuple(pad), tuple(stride)))
    if d == 2:
        torch.testing.assert_close(image, F.fold(c, size, k, dil, pad, stride), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_emulated_kernels_in_lower_precision(dtype, rng):
    x = torch.randn(2, 3, 6, 7, generator=rng).to(dtype)
    cols = emulated().im2col(x, [3, 2], [1, 2], [1, 0], [2, 1], True)
    assert torch.equal(cols, F.unfold(x.double(), (3, 2), (1, 2), (1, 0), (2, 1)).to(dtype))
    image = emulated().col2im(cols, [6, 7], [3, 2], [1, 2], [1, 0], [2, 1], False)
    # opmath (float32) accumulation, as the CPU loops do.
    assert torch.equal(image, convt_ext.col2im(cols, (6, 7), (3, 2), (1, 2), (1, 0), (2, 1)))


# Every dtype the kernels take besides float16/bfloat16/float32/float64 (tested above):
# col2im's (exact sums for bool and integers), and im2col's copy-only ones.
SUM_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32,
              torch.uint64, torch.complex64, torch.complex128]
COPY_ONLY = [torch.float8_e5m2, torch.float8_e4m3fn, torch.float8_e5m2fnuz, torch.float8_e4m3fnuz, torch.float8_e8m0fnu,
             torch.complex32]
DTYPE_CASES = [c for i, c in enumerate(CASES) if i % 4 < 2][:6]  # contiguous and transposed


def test_dtype_cases_compute_in_every_dimension():
    assert [c[0] for c in DTYPE_CASES] == [1, 2, 2, 3, 3, 1] and all(c[1] > 0 for c in DTYPE_CASES)
    assert {c[-1] for c in DTYPE_CASES} == {"contiguous", "transposed"}


@pytest.mark.parametrize("int32", [True, False], ids=["int32", "int64"])
@pytest.mark.parametrize("dtype", SUM_DTYPES + COPY_ONLY, ids=str)
def test_emulated_kernels_every_dtype(dtype, int32, rng):
    """The device code in every dtype: im2col bit for bit as U's gather and the CPU loops;
    col2im's sums as U's index_add_ (integers wrap, bool is an OR) and the CPU loops'."""
    for d, batch, channels, size, k, dil, pad, stride, layout in DTYPE_CASES:
        x = random_of(dtype, (batch, channels, *size), rng, "transposed" if layout == "transposed" else "contiguous")
        cols = emulated().im2col(x, k, dil, pad, stride, int32)
        assert_same(cols, convt_ext.im2col(x, tuple(k), tuple(dil), tuple(pad), tuple(stride)))
        if dtype in COPY_ONLY:
            wide = torch.complex64 if dtype.is_complex else torch.float32
            assert_same(cols, u_im2col(x.to(wide), k, dil, pad, stride).to(dtype))
            with pytest.raises(TypeError, match="col2im: input"):
                emulated().col2im(cols, size, k, dil, pad, stride, int32)
            continue
        assert_same(cols, u_im2col(x, k, dil, pad, stride))
        c = random_of(dtype, cols.shape, rng, "offset")
        image = emulated().col2im(c, size, k, dil, pad, stride, int32)
        assert_same(image, convt_ext.col2im(c, tuple(size), tuple(k), tuple(dil), tuple(pad), tuple(stride)))
        if dtype.is_complex:
            torch.testing.assert_close(image.to(torch.complex128), u_col2im(c.to(torch.complex128), size, k, dil, pad, stride),
                                       rtol=1e-5, atol=1e-5)
        else:
            assert_same(image, u_col2im(c, size, k, dil, pad, stride))


@pytest.mark.parametrize(
    "size,k,dil,pad,stride",
    [
        ((5, 5), (3, 3), (1, 1), (2**40, 0), (2**41, 1)),  # huge padding and stride: one window row
        ((5,), (2,), (2**31,), (2**31,), (2**31,)),  # dilation past int32
        ((4, 4, 4), (1, 2, 1), (1, 1, 1), (0, 2**31 - 2, 0), (1, 2**32, 1)),
        ((7,), (3,), (1,), (2**30,), (2**31 - 1,)),
    ],
)
def test_huge_geometry_takes_64bit_indexing(size, k, dil, pad, stride, rng):
    x = torch.randn(1, 2, *size, generator=rng, dtype=torch.float64)
    expected = convt_ext.im2col(x, k, dil, pad, stride)  # the CPU loops
    if len(size) == 2:
        torch.testing.assert_close(expected, F.unfold(x, k, dil, pad, stride), rtol=0, atol=0)
    # The int32 path must refuse geometry whose coordinates do not fit ...
    with pytest.raises(ValueError, match="32-bit"):
        emulated().im2col(x, list(k), list(dil), list(pad), list(stride), True)
    # ... and the int64 path computes it exactly.
    assert torch.equal(emulated().im2col(x, list(k), list(dil), list(pad), list(stride), False), expected)
    c = torch.randn(expected.shape, generator=rng, dtype=torch.float64)
    assert torch.equal(
        emulated().col2im(c, list(size), list(k), list(dil), list(pad), list(stride), False),
        convt_ext.col2im(c, size, k, dil, pad, stride),
    )


def _reach(image, k, d, p, s):
    """The largest coordinate magnitude the elements form (csrc/elements.h, fits_index)."""
    windows = (image + 2 * p - d * (k - 1) - 1) // s + 1
    return (windows - 1) * s + (k - 1) * d + image + 2 * p + s


def test_int32_boundary_of_the_geometry(rng):
    """The int32 path is taken exactly up to the last geometry whose coordinates fit."""
    image, k, d, s = 5, 3, 1, 2**29
    limit = 2**31 - 1
    # The largest padding whose coordinates fit, by bisection (reach grows with padding).
    lo, hi = 0, 2**30
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _reach(image, k, d, mid, s) < limit:
            lo = mid
        else:
            hi = mid - 1
    p = lo
    x = torch.randn(1, 2, image, generator=rng, dtype=torch.float64)
    for padding, fits in ((p, True), (p + 1, False)):
        expected = convt_ext.im2col(x, (k,), (d,), (padding,), (s,))
        assert expected.shape[-1] >= 1
        if fits:
            assert torch.equal(emulated().im2col(x, [k], [d], [padding], [s], True), expected)
        else:
            with pytest.raises(ValueError, match="32-bit"):
                emulated().im2col(x, [k], [d], [padding], [s], True)
        assert torch.equal(emulated().im2col(x, [k], [d], [padding], [s], False), expected)


def _depthwise_cases():
    """Depthwise and few-channel grouped layers for the depthwise kernels' grid:
    multipliers 1-2, 1-3 channels per group, every dimension, strides,
    padding, dilation and conv_transpose's output_padding."""
    rnd = random.Random(29)
    cases = []
    for i in range(24):
        d = (1, 2, 3)[i % 3]
        groups = rnd.randint(1, 3)
        ci, cw = ((1, 1), (1, 2), (2, 1), (3, 2))[i % 4]
        k = [rnd.randint(1, 3) for _ in range(d)]
        dil = [rnd.randint(1, 2) for _ in range(d)]
        stride = [rnd.randint(1, 3) for _ in range(d)]
        pad = [rnd.randint(0, 2) for _ in range(d)]
        size = [rnd.randint(max(1, dil[j] * (k[j] - 1) + 1 - 2 * pad[j]), 6 if d == 3 else 8) for j in range(d)]
        cases.append((d, 1 + i % 2, groups, ci, cw, size, k, dil, pad, stride))
    return cases


DEPTHWISE_CASES = _depthwise_cases()


@pytest.mark.parametrize("case", DEPTHWISE_CASES)
@pytest.mark.parametrize("int32", [True, False])
def test_emulated_depthwise_kernels_match_torch(case, int32):
    """The depthwise kernels' element functions over the whole grid (conv,
    conv_transpose as col2im's gather, the weight gradient), against torch in
    float64: every element written (the result starts as a sentinel)."""
    d, n, groups, ci, cw, size, k, dil, pad, stride = case
    g = torch.Generator().manual_seed(DEPTHWISE_CASES.index(case))
    conv = (F.conv1d, F.conv2d, F.conv3d)[d - 1]
    conv_t = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[d - 1]
    x = torch.randn(n, groups * ci, *size, dtype=torch.float64, generator=g)
    w = torch.randn(groups * cw, ci, *k, dtype=torch.float64, generator=g)
    b = torch.randn(groups * cw, dtype=torch.float64, generator=g)
    y = conv(x, w, b, stride, pad, dil, groups)
    got = emulated().depthwise(x, y, w, b, y, k, stride, pad, dil, groups, 0, int32)
    torch.testing.assert_close(got, y, rtol=1e-12, atol=1e-12)
    # conv_transpose of y back to x's shape (the guide's output_padding): the image side is written.
    bt = torch.randn(groups * ci, dtype=torch.float64, generator=g)
    adj = [(size[j] + 2 * pad[j] - dil[j] * (k[j] - 1) - 1) % stride[j] for j in range(d)]
    xt = conv_t(y, w, bt, stride, pad, adj, groups, dil)
    assert xt.shape == x.shape
    out = torch.zeros(n, groups * ci, *xt.shape[2:], dtype=torch.float64)
    got = emulated().depthwise(out, y, w, bt, out, k, stride, pad, dil, groups, 1, int32)
    torch.testing.assert_close(got, xt, rtol=1e-12, atol=1e-12)
    dw = torch.nn.grad.__dict__[f"conv{d}d_weight"](x, w.shape, y, stride, pad, dil, groups)
    got = emulated().depthwise(x, y, w, None, torch.zeros_like(w), k, stride, pad, dil, groups, 2, int32)
    torch.testing.assert_close(got, dw, rtol=1e-12, atol=1e-10)


def test_depthwise_cases_cover_every_form():
    assert {c[0] for c in DEPTHWISE_CASES} == {1, 2, 3}
    assert {(c[3], c[4]) for c in DEPTHWISE_CASES} == {(1, 1), (1, 2), (2, 1), (3, 2)}
    assert any(s > 1 for c in DEPTHWISE_CASES for s in c[9]) and any(v > 1 for c in DEPTHWISE_CASES for v in c[7])
