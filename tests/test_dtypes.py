"""im2col and col2im in every dtype, and im2col_view.

Expected values come from torch: F.unfold / F.fold for bool and complex (in 2-d, and 1-d
through a unit dimension), torch in float64 for the floating types, and for integers an
int64 reference built from the nonzeros of U (convt_ext.im2col_matrix; conftest's
u_im2col / u_col2im: a gather and an index_add_), cast to the dtype so that sums wrap as
torch.add's do. That U itself is torch's unfold is checked here too, in float64.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import convt_ext
from conftest import SAME_SIZE_INT, assert_same, make_tensor, random_of, requires_cuda, u_col2im, u_im2col
from emulated_ops import emulated

ops = torch.ops.convt_ext

BOOL = [torch.bool]
INTS = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32, torch.uint64]
FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
COMPLEX = [torch.complex64, torch.complex128]
SUM_DTYPES = BOOL + INTS + FLOATS + COMPLEX  # im2col and col2im
# im2col only: a copy of bits; torch has no sum for them (torch.add refuses float8).
COPY_ONLY = [torch.float8_e5m2, torch.float8_e4m3fn, torch.float8_e5m2fnuz, torch.float8_e4m3fnuz,
             torch.float8_e8m0fnu, torch.complex32]

# (shape, kernel_size, dilation, padding, stride): D = len(kernel_size); every batch is
# non-empty, taps overlap (col2im sums up to 27 of them), padding and strides vary.
CASES = [
    ((2, 3, 11), (4,), (1,), (2,), (1,)),
    ((1, 2, 13), (3,), (2,), (1,), (2,)),
    ((2, 3, 7, 8), (3, 3), (1, 1), (1, 1), (1, 1)),
    ((3, 2, 9, 7), (2, 3), (2, 1), (0, 2), (2, 1)),
    ((2, 2, 5, 6, 5), (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1)),
    ((1, 3, 6, 5, 7), (2, 1, 3), (2, 1, 1), (1, 0, 2), (1, 2, 2)),
]


def _cid(case):
    shape, k, d, p, s = case
    return f"{len(k)}d-{'x'.join(map(str, shape))}-k{''.join(map(str, k))}-d{''.join(map(str, d))}-p{''.join(map(str, p))}-s{''.join(map(str, s))}"


def torch_unfold(x, k, d, p, s):
    """torch's own im2col (F.unfold) for 1-d (through a unit dimension) and 2-d."""
    if len(k) == 1:
        return F.unfold(x.unsqueeze(2), (1, k[0]), (1, d[0]), (0, p[0]), (1, s[0]))
    return F.unfold(x, k, d, p, s)


def torch_fold(c, size, k, d, p, s):
    if len(k) == 1:
        return F.fold(c, (1, size[0]), (1, k[0]), (1, d[0]), (0, p[0]), (1, s[0])).squeeze(2)
    return F.fold(c, size, k, d, p, s)


def _cases_with_torch():
    return [c for c in CASES if len(c[1]) < 3]


# ------------------------------------------------------------------ the reference


@pytest.mark.parametrize("case", CASES, ids=_cid)
def test_u_reference_is_torchs_unfold(case, rng):
    """The U gather and index_add_ that the integer tests trust, against torch in float64
    (F.unfold/F.fold; for 3-d a one-hot conv3d and its gradient)."""
    shape, k, d, p, s = case
    x = torch.randn(shape, generator=rng, dtype=torch.float64)
    if len(k) < 3:
        want = torch_unfold(x, k, d, p, s)
    else:
        eye = torch.eye(math.prod(k), dtype=x.dtype).reshape(-1, 1, *k)
        want = F.conv3d(x.reshape(-1, 1, *shape[2:]), eye, None, s, p, d).reshape(shape[0], shape[1] * eye.shape[0], -1)
    assert want.abs().sum() > 0
    assert torch.equal(u_im2col(x, k, d, p, s), want)
    c = torch.randn(want.shape, generator=rng, dtype=torch.float64)
    if len(k) < 3:
        image = torch_fold(c, shape[2:], k, d, p, s)
    else:
        xr = x.clone().requires_grad_()
        (image,) = torch.autograd.grad(F.conv3d(xr.reshape(-1, 1, *shape[2:]), eye, None, s, p, d).reshape(want.shape), xr, c)
    torch.testing.assert_close(u_col2im(c, shape[2:], k, d, p, s), image, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ every dtype


@pytest.mark.parametrize("dtype", SUM_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_cid)
def test_im2col_col2im_every_dtype(case, dtype, rng):
    shape, k, d, p, s = case
    layout = ("contiguous", "transposed", "offset")[sum(shape) % 3]
    x = random_of(dtype, shape, rng, layout)
    x_before = x.clone()
    cols = convt_ext.im2col(x, k, d, p, s)
    assert cols.dtype == dtype and cols.grad_fn is None
    # im2col is a copy in every dtype: exactly the reference.
    assert_same(cols, u_im2col(x, k, d, p, s))
    if len(k) < 3 and dtype in BOOL + COMPLEX:
        assert_same(cols, torch_unfold(x, k, d, p, s))
    if dtype in FLOATS:
        assert_same(cols, torch_unfold(x.double(), k, d, p, s).to(dtype) if len(k) < 3 else u_im2col(x.double(), k, d, p, s).to(dtype))

    c = random_of(dtype, cols.shape, rng, "transposed" if layout == "contiguous" else "contiguous")
    image = convt_ext.col2im(c, shape[2:], k, d, p, s)
    assert image.dtype == dtype and image.shape == shape
    if dtype in BOOL + INTS:
        # bool: a logical OR of the taps; integers: their sum modulo 2^bits.
        assert_same(image, u_col2im(c, shape[2:], k, d, p, s))
    if dtype in BOOL + COMPLEX and len(k) < 3:
        want = torch_fold(c, shape[2:], k, d, p, s)
        assert_same(image, want) if dtype == torch.bool else torch.testing.assert_close(image, want, rtol=1e-5, atol=1e-5)
    if dtype in FLOATS + COMPLEX:
        wide = torch.complex128 if dtype.is_complex else torch.float64
        want = u_col2im(c.to(wide), shape[2:], k, d, p, s)
        tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5, torch.complex64: 1e-5}.get(dtype, 1e-12)
        torch.testing.assert_close(image.to(wide), want, rtol=tol, atol=tol)
    assert_same(x, x_before)
    # Unbatched, and the dispatcher ops.
    assert_same(convt_ext.im2col(x[0], k, d, p, s), cols[0])
    assert_same(convt_ext.col2im(c[0], shape[2:], k, d, p, s), image[0])
    assert_same(ops.im2col(x, list(k), list(d), list(p), list(s)), cols)


def test_cases_exercise_every_dimension_and_sum():
    assert {len(c[1]) for c in CASES} == {1, 2, 3}
    assert all(c[0][0] > 0 for c in CASES)
    # Every case has pixels that sum several taps.
    for shape, k, d, p, s in CASES:
        counts = u_col2im(torch.ones(u_im2col(torch.zeros(shape), k, d, p, s).shape), shape[2:], k, d, p, s)
        assert counts.max() >= 2


@pytest.mark.parametrize("dtype,value,taps,want", [
    (torch.uint8, 200, 9, 9 * 200 % 256),               # 1800 wraps to 8
    (torch.int8, 100, 9, (9 * 100 + 128) % 256 - 128),  # 900 wraps to -124
    (torch.int8, -128, 4, 0),
    (torch.int16, 2**14, 9, (9 * 2**14 + 2**15) % 2**16 - 2**15),
    (torch.int32, 2**30, 9, (9 * 2**30 + 2**31) % 2**32 - 2**31),
    (torch.int64, 2**62, 9, (9 * 2**62 + 2**63) % 2**64 - 2**63),
    (torch.uint16, 40000, 9, 9 * 40000 % 2**16),
    (torch.uint32, 2**31 + 7, 4, 4 * (2**31 + 7) % 2**32),
    (torch.uint64, 2**63 + 5, 9, 9 * (2**63 + 5) % 2**64),
])
def test_col2im_integer_sums_wrap(dtype, value, taps, want):
    """A pixel under `taps` windows of equal columns gets taps*value modulo 2^bits, as
    torch.add of that many such tensors (where torch has add for the dtype)."""
    k = 3 if taps == 9 else 2
    size = (2 * k - 1, 2 * k - 1)  # the centre pixel is under all k*k windows
    cols = torch.full((1, k * k, k * k), value if value < 2**63 else value - 2**64, dtype=torch.int64).to(dtype)
    image = convt_ext.col2im(cols, size, k)
    centre = image[0, 0, k - 1, k - 1]
    wrapped = want if want < 2**63 else want - 2**64  # uint64 read through int64's bits
    bits = centre.view(torch.int64) if dtype == torch.uint64 else centre.to(torch.int64)
    assert bits.item() == wrapped
    assert_same(image, u_col2im(cols, size, (k, k), (1, 1), (0, 0), (1, 1)))
    if dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        one = cols[0, 0, 0]
        total = one
        for _ in range(taps - 1):
            total = torch.add(total, one)
        assert centre.item() == total.item()


def test_col2im_bool_is_a_logical_or():
    cols = torch.zeros(1, 9, 9, dtype=torch.bool)
    cols[0, 4, 0] = True  # one tap of pixel (1, 1)
    cols[0, 0, 4] = cols[0, 8, 0] = True  # two taps of (2, 2)
    image = convt_ext.col2im(cols, (5, 5), 3)
    assert_same(image, F.fold(cols, (5, 5), 3))
    want = torch.zeros(1, 1, 5, 5, dtype=torch.bool)
    want[0, 0, 1, 1] = want[0, 0, 2, 2] = True
    assert_same(image, want)


@pytest.mark.parametrize("dtype", COPY_ONLY, ids=str)
@pytest.mark.parametrize("case", CASES[1::2], ids=_cid)
def test_im2col_copy_only_dtypes(case, dtype, rng):
    """float8 and complex32: im2col copies their bits (padding: zero bits, +0); col2im
    refuses them with a TypeError, as torch has no sum for them."""
    shape, k, d, p, s = case
    wide = torch.complex64 if dtype.is_complex else torch.float32
    x = random_of(dtype, shape, rng)
    cols = convt_ext.im2col(x, k, d, p, s)
    assert cols.dtype == dtype
    bits = SAME_SIZE_INT[x.element_size()]
    assert_same(cols.view(bits), convt_ext.im2col(x.view(bits), k, d, p, s))
    assert_same(cols, u_im2col(x.to(wide), k, d, p, s).to(dtype))
    with pytest.raises(TypeError, match="col2im: input must be .*float8 or complex32"):
        convt_ext.col2im(cols, shape[2:], k, d, p, s)


@pytest.mark.parametrize("dtype", [torch.float4_e2m1fn_x2, torch.uint4, torch.int4, torch.bits8], ids=str)
def test_dtypes_without_kernels_are_type_errors(dtype):
    """Packed sub-byte types and raw bits: no element to copy; a TypeError naming input."""
    x = torch.empty(1, 1, 4, 4, dtype=dtype)
    with pytest.raises(TypeError, match="im2col: input must be a bool, integer, floating or complex tensor"):
        convt_ext.im2col(x, 2)
    with pytest.raises(TypeError, match="col2im: input"):
        convt_ext.col2im(torch.empty(1, 4, 9, dtype=dtype), (4, 4), 2)
    with pytest.raises(TypeError, match="col2im: input"):
        emulated().col2im(torch.empty(1, 4, 9, dtype=dtype), [4, 4], [2, 2], [1, 1], [0, 0], [1, 1], True)


def test_sizes_in_bytes_count_16_for_complex128():
    """A result of 2^59 + 1 complex128 elements needs more than 2^63 - 1 bytes: a ValueError
    before any allocation, for im2col and col2im."""
    n = 2**59 + 1
    x = torch.zeros(1, 1, 1, dtype=torch.complex128)
    with pytest.raises(ValueError, match=r"im2col: the column matrix of shape \(1, 1, 576460752303423489\) would need more than 2\^63-1 bytes.*padding"):
        convt_ext.im2col(x, (1,), 1, (n - 1) // 2)
    cols = torch.zeros(1, 1, 1, dtype=torch.complex128).expand(1, 1, n)
    with pytest.raises(ValueError, match=r"col2im: the output of shape \(1, 1, 576460752303423489\) would need more than 2\^63-1 bytes"):
        convt_ext.col2im(cols, (n,), (1,))


def test_convolutions_stay_float_only():
    for dtype in (torch.int64, torch.bool, torch.complex64, torch.float8_e4m3fn):
        with pytest.raises(TypeError, match="conv2d: input must be a float16, bfloat16, float32 or float64"):
            convt_ext.conv2d(torch.zeros(1, 1, 4, 4, dtype=dtype), torch.zeros(1, 1, 2, 2, dtype=dtype))


# ------------------------------------------------------------------ out=, autograd, fake kernels, compile


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int32, torch.uint64, torch.complex128, torch.bfloat16], ids=str)
def test_out_overloads(dtype, rng):
    shape, k, d, p, s = CASES[3]
    x = random_of(dtype, shape, rng)
    want = u_im2col(x, k, d, p, s)
    out = torch.empty_strided(want.shape, (1, want.shape[0], want.shape[0] * want.shape[1]), dtype=dtype)
    assert convt_ext.im2col(x, k, d, p, s, out=out) is out
    assert_same(out, want)
    c = random_of(dtype, want.shape, rng)
    image = torch.empty(shape, dtype=dtype)
    convt_ext.col2im(c, shape[2:], k, d, p, s, out=image)
    assert_same(image, convt_ext.col2im(c, shape[2:], k, d, p, s))
    if dtype in BOOL + INTS:
        assert_same(image, u_col2im(c, shape[2:], k, d, p, s))
    with pytest.raises(TypeError, match="out must have the input's dtype"):
        convt_ext.im2col(x, k, d, p, s, out=torch.empty(want.shape, dtype=torch.float64 if dtype != torch.float64 else torch.float32))


@pytest.mark.parametrize("dtype", [torch.bool, torch.int16, torch.uint32, torch.complex64], ids=str)
def test_opcheck_new_dtypes(dtype, rng):
    x = random_of(dtype, (2, 3, 6, 5), rng)
    torch.library.opcheck(ops.im2col.default, (x, [2, 3], [1, 1], [1, 0], [2, 1]))
    cols = convt_ext.im2col(x, (2, 3), 1, (1, 0), (2, 1))
    torch.library.opcheck(ops.col2im.default, (cols, [6, 5], [2, 3], [1, 1], [1, 0], [2, 1]))
    torch.library.opcheck(ops.im2col.out, (x, [2, 3], [1, 1], [1, 0], [2, 1]), {"out": torch.empty(cols.shape, dtype=dtype)})


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool, torch.complex128], ids=str)
def test_compile_fullgraph_new_dtypes(dtype, rng):
    def roundtrip(x):
        cols = convt_ext.im2col(x, (3, 2), (1, 2), (1, 1), (2, 1))
        return convt_ext.col2im(cols, x.shape[-2:], (3, 2), (1, 2), (1, 1), (2, 1))

    torch._dynamo.reset()
    compiled = torch.compile(roundtrip, fullgraph=True, backend="aot_eager")
    x = random_of(dtype, (2, 3, 8, 7), rng)
    got = compiled(x)
    want = u_col2im(u_im2col(x, (3, 2), (1, 2), (1, 1), (2, 1)), (8, 7), (3, 2), (1, 2), (1, 1), (2, 1))
    if dtype.is_complex:
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    else:
        assert_same(got, want)


def test_fake_kernels_keep_the_dtype():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        for dtype in SUM_DTYPES + COPY_ONLY:
            cols = convt_ext.im2col(torch.empty(2, 3, 7, 6, dtype=dtype), 3, padding=1)
            assert cols.dtype == dtype and tuple(cols.shape) == (2, 27, 42)
        for dtype in SUM_DTYPES:
            image = convt_ext.col2im(torch.empty(2, 27, 42, dtype=dtype), (7, 6), 3, padding=1)
            assert image.dtype == dtype and tuple(image.shape) == (2, 3, 7, 6)


@pytest.mark.parametrize("dtype", INTS + BOOL, ids=str)
def test_integers_have_no_gradient(dtype, rng):
    x = random_of(dtype, (1, 2, 5, 5), rng)
    with pytest.raises(RuntimeError, match="floating point"):
        x.requires_grad_()
    with torch.autograd.forward_ad.dual_level():  # a forward-mode level open: still no derivative
        cols = convt_ext.im2col(x, 2)
        image = convt_ext.col2im(cols, (5, 5), 2)
    assert cols.grad_fn is None and image.grad_fn is None and not cols.requires_grad


def test_complex_gradients(rng):
    from torch.autograd import gradcheck, gradgradcheck

    x = torch.randn(2, 2, 5, 4, generator=rng, dtype=torch.complex128).requires_grad_()
    f = lambda t: convt_ext.im2col(t, (2, 3), (1, 1), (1, 0), (2, 1))  # noqa: E731
    assert gradcheck(f, (x,)) and gradgradcheck(f, (x,))
    c = torch.randn(f(x).shape, generator=rng, dtype=torch.complex128).requires_grad_()
    g = lambda t: convt_ext.col2im(t, (5, 4), (2, 3), (1, 1), (1, 0), (2, 1))  # noqa: E731
    assert gradcheck(g, (c,)) and gradgradcheck(g, (c,))
    # And torch's own complex gradient of F.unfold.
    gy = torch.randn(f(x).shape, generator=rng, dtype=torch.complex128)
    (ours,) = torch.autograd.grad(f(x), x, gy)
    (theirs,) = torch.autograd.grad(F.unfold(x, (2, 3), 1, (1, 0), (2, 1)), x, gy)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_vmap_over_integer_input(rng):
    x = random_of(torch.int32, (4, 2, 3, 6, 5), rng)
    got = torch.func.vmap(lambda t: convt_ext.im2col(t, (2, 2), 1, 1, 2))(x)
    assert_same(got, torch.stack([u_im2col(t, (2, 2), (1, 1), (1, 1), (2, 2)) for t in x]))


# ------------------------------------------------------------------ CUDA


@pytest.mark.parametrize("dtype", SUM_DTYPES + COPY_ONLY, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_cid)
@pytest.mark.cuda
@requires_cuda
def test_cuda_every_dtype_matches_cpu(case, dtype):
    """The CUDA kernels in every dtype: im2col bit for bit as the CPU's; col2im too for
    bool and integers (exact sums) and within rounding for floating types."""
    shape, k, d, p, s = case
    gen = torch.Generator().manual_seed(len(shape) * 1000 + sum(shape))
    x = random_of(dtype, shape, gen, "transposed")
    cols = convt_ext.im2col(x.cuda(), k, d, p, s)
    assert cols.device.type == "cuda"
    assert_same(cols.cpu(), convt_ext.im2col(x, k, d, p, s))
    if dtype in COPY_ONLY:
        return
    c = random_of(dtype, cols.shape, gen)
    image = convt_ext.col2im(c.cuda(), shape[2:], k, d, p, s).cpu()
    want = convt_ext.col2im(c, shape[2:], k, d, p, s)
    if dtype in BOOL + INTS:
        assert_same(image, want)
        assert_same(image, u_col2im(c, shape[2:], k, d, p, s))
    else:
        tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5, torch.complex64: 1e-5}.get(dtype, 1e-12)
        torch.testing.assert_close(image, want, rtol=tol, atol=tol)


# ------------------------------------------------------------------ im2col_view


def _view_reference(x, k, d, s):
    """im2col_view by indexing: view[..., c, k, o] = x[..., c, o*s + k*d], built with
    plain loops over the window positions (independent of Tensor.unfold)."""
    D = len(k)
    spatial = x.shape[-D:]
    windows = [(spatial[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(D)]
    out = torch.empty(*x.shape[:-D], *k, *windows, dtype=x.dtype)
    import itertools

    for kk in itertools.product(*[range(n) for n in k]):
        for oo in itertools.product(*[range(n) for n in windows]):
            src = tuple(oo[i] * s[i] + kk[i] * d[i] for i in range(D))
            out[(Ellipsis, *kk, *oo)] = x[(Ellipsis, *src)]
    return out


@pytest.mark.parametrize("case", CASES, ids=_cid)
def test_im2col_view_layout_strides_and_storage(case, rng):
    shape, k, d, _, s = case
    x = make_tensor(shape, rng, "transposed")
    view = convt_ext.im2col_view(x, k, d, s)
    D = len(k)
    # Its strides are the relation's: dilation (kernel offsets) and stride (windows)
    # times the input's, so element [k, o] sits at o*s + k*d: U's nonzero pattern.
    xs = x.stride()
    assert view.stride() == xs[:2] + tuple(d[i] * xs[2 + i] for i in range(D)) + tuple(s[i] * xs[2 + i] for i in range(D))
    assert view.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    assert view.storage_offset() == x.storage_offset()
    assert torch.equal(view, _view_reference(x, k, d, s))
    # Zero copy: a write into the input shows in the view.
    x[0, 0].fill_(123.0)
    assert (view[0, 0] == 123.0).all()


@pytest.mark.parametrize("dtype", SUM_DTYPES + COPY_ONLY, ids=str)
def test_im2col_view_every_dtype(dtype, rng):
    shape, k, d, _, s = CASES[3]
    x = random_of(dtype, shape, rng)
    view = convt_ext.im2col_view(x, k, d, s)
    assert view.dtype == dtype and view._base is x
    assert_same(view.reshape(shape[0], -1, view.shape[-2] * view.shape[-1]), convt_ext.im2col(x, k, d, 0, s))


@pytest.mark.parametrize("D", [1, 2, 3])
def test_einsum_convolution_over_the_view(D, rng):
    """A convolution as one einsum over the view, which copies nothing, equals
    F.conv{D}d in float64 (padding through F.pad first)."""
    shape, k, d, p, s = [c for c in CASES if len(c[1]) == D][1]
    x = torch.randn(shape, generator=rng, dtype=torch.float64)
    w = torch.randn(4, shape[1], *k, generator=rng, dtype=torch.float64)
    padded = F.pad(x, [q for i in reversed(range(D)) for q in (p[i], p[i])])
    letters = "hij"[:D]
    kernel = "klm"[:D]
    y = torch.einsum(f"nc{kernel}{letters},oc{kernel}->no{letters}", convt_ext.im2col_view(padded, k, d, s), w)
    want = (F.conv1d, F.conv2d, F.conv3d)[D - 1](x, w, None, s, p, d)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)


def test_im2col_view_gradient_is_col2im(rng):
    x = torch.randn(2, 3, 7, 6, generator=rng, dtype=torch.float64, requires_grad=True)
    view = convt_ext.im2col_view(x, (3, 2), (1, 2), (2, 1))
    g = torch.randn(view.shape, generator=rng, dtype=torch.float64)
    (gx,) = torch.autograd.grad(view, x, g)
    torch.testing.assert_close(gx, F.fold(g.reshape(2, 18, -1), (7, 6), (3, 2), (1, 2), 0, (2, 1)), rtol=1e-12, atol=1e-12)


def test_im2col_view_under_vmap(rng):
    x = torch.randn(4, 2, 3, 9, 8, generator=rng, dtype=torch.float64)
    f = lambda t: convt_ext.im2col_view(t, (3, 2), (2, 1), (1, 3))  # noqa: E731
    # Each call sees a batched (N, C, H, W) sample; and with in_dims=1 an unbatched one.
    assert torch.equal(torch.func.vmap(f)(x), torch.stack([f(t) for t in x]))
    assert torch.equal(torch.func.vmap(f, in_dims=1)(x), torch.stack([f(x[:, j]) for j in range(x.shape[1])]))
    # vmap of a gradient through the view (per-sample gradients).
    w = torch.randn(5, 3, 3, 2, generator=rng, dtype=torch.float64)

    def loss(t):
        return torch.einsum("ckl hw,ockl->ohw".replace(" ", ""), f(t), w).square().sum()

    grads = torch.func.vmap(torch.func.grad(loss))(x[0])
    want = torch.stack([torch.func.grad(loss)(t) for t in x[0]])
    torch.testing.assert_close(grads, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dynamic", [False, True])
def test_im2col_view_compiles_fullgraph(dynamic, rng):
    def conv(x, w):
        return torch.einsum("ncklhw,ockl->nohw", convt_ext.im2col_view(x, w.shape[2:], (1, 2), (2, 1)), w)

    torch._dynamo.reset()
    compiled = torch.compile(conv, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    for shape in ((2, 3, 9, 8), (1, 3, 11, 10)):
        x = torch.randn(shape, generator=rng, dtype=torch.float64, requires_grad=True)
        w = torch.randn(4, 3, 3, 2, generator=rng, dtype=torch.float64, requires_grad=True)
        y = compiled(x, w)
        want = F.conv2d(x, w, None, (2, 1), 0, (1, 2))
        torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
        g = torch.randn(want.shape, generator=rng, dtype=torch.float64)
        got_grads = torch.autograd.grad(y, (x, w), g)
        want_grads = torch.autograd.grad(want, (x, w), g)
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_im2col_view_unbatched_and_dimension_rule(rng):
    x = torch.randn(3, 7, 6, generator=rng, dtype=torch.float64)
    # A 3-d input with int arguments is unbatched 2-d, as F.unfold and im2col.
    view = convt_ext.im2col_view(x, 2)
    assert view.shape == (3, 2, 2, 6, 5)
    assert torch.equal(view.reshape(12, 30), convt_ext.im2col(x, 2))
    # A 1-tuple makes it 1-d: the same 3-d input is then (N, C, L).
    assert convt_ext.im2col_view(x, (3,)).shape == (3, 7, 3, 4)
    assert convt_ext.im2col_view(torch.zeros(2, 3, 4, 5, 6), 2).shape == (2, 3, 2, 2, 2, 3, 4, 5)
    assert convt_ext.im2col_view(torch.zeros(0, 3, 4, 5), 2).shape == (0, 3, 2, 2, 3, 4)


VIEW_ERRORS = [
    (dict(input=torch.zeros(1, 1, 4, 4), kernel_size=0), ValueError, r"im2col_view: kernel_size must be positive"),
    (dict(input=torch.zeros(1, 1, 4, 4), kernel_size=(2, -1)), ValueError, r"kernel_size must be positive"),
    (dict(input=torch.zeros(1, 1, 4, 4), kernel_size=2, stride=0), ValueError, r"stride must be positive"),
    (dict(input=torch.zeros(1, 1, 4, 4), kernel_size=2, stride=(1, -2)), ValueError, r"stride must be positive"),
    (dict(input=torch.zeros(1, 1, 4, 4), kernel_size=2, dilation=0), ValueError, r"dilation must be positive"),
    (dict(input=torch.zeros(1, 1, 4, 4), kernel_size=5), ValueError, r"input of spatial size \(4, 4\) is too small for kernel_size"),
    (dict(input=torch.zeros(1, 1, 4, 4), kernel_size=3, dilation=2), ValueError, r"too small.*F\.pad"),
    (dict(input=torch.zeros(1, 0, 4, 4), kernel_size=2), ValueError, r"non-zero channels"),
    (dict(input=torch.zeros(1, 2, 0, 4), kernel_size=1), ValueError, r"non-zero channels and spatial"),
    (dict(input=torch.zeros(4), kernel_size=2), ValueError, r"input must be 2-d to 5-d"),
    (dict(input=torch.zeros(1, 1, 4, 4), kernel_size=(2, 2, 2)), ValueError, r"input of spatial size \(1, 4, 4\) is too small"),
    (dict(input=torch.zeros(1, 1, 2, 4, 4), kernel_size=(2, 2)), ValueError, r"input must be 3-d \(C, \*spatial\) or 4-d"),
    (dict(input=torch.zeros(1, 1, 4, 4), kernel_size=(2, 2), stride=(1, 1, 1)), ValueError, r"stride.*kernel_size"),
    (dict(input=torch.zeros(1, 1, 4, 4), kernel_size=True), TypeError, r"kernel_size must be an int"),
    (dict(input=torch.zeros(1, 1, 4, 4), kernel_size="2"), TypeError, r"kernel_size"),
    (dict(input=torch.zeros(1, 1, 4, 4), kernel_size=2, dilation=1.5), TypeError, r"dilation"),
    (dict(input=torch.zeros(1, 1, 4, 4), kernel_size=2, stride=None), TypeError, r"stride"),
    (dict(input=torch.zeros(1, 1, 4, 4), kernel_size=2**63), ValueError, r"kernel_size=.* does not fit in int64"),
    (dict(input=[[1.0]], kernel_size=1), TypeError, r"input must be a Tensor"),
]


@pytest.mark.parametrize("kwargs,exc,match", VIEW_ERRORS, ids=[f"{i}-{e.__name__}" for i, (_, e, _m) in enumerate(VIEW_ERRORS)])
def test_im2col_view_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        convt_ext.im2col_view(**kwargs)
