"""im2col / col2im (the foundation): parity with F.unfold / F.fold, adjointness,
autograd, opcheck, torch.compile, dtypes, argument errors, 64-bit indexing.

All expected values come from torch.nn.functional (or direct indexing)."""
import random
import re
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import convt_ext
from conftest import LAYOUTS, assert_unchanged, make_tensor, randn, requires_cuda

ops = torch.ops.convt_ext


def window_count(size, k, s, p, d):
    span = size + 2 * p - d * (k - 1) - 1
    return span // s + 1 if span >= 0 else 0


# ------------------------------------------------------------------ the sweep


def _sweep(n_cases, seed):
    """A deterministic random sample of the cartesian product of geometries,
    keeping only those F.unfold accepts (>= 1 window per dimension)."""
    r = random.Random(seed)
    cases = []
    batches = [0, 1, 3, None]  # None: unbatched (C, H, W)
    while len(cases) < n_cases:
        k = (r.randint(1, 5), r.randint(1, 5))
        s = (r.randint(1, 3), r.randint(1, 3))
        p = (r.randint(0, 3), r.randint(0, 3))
        d = (r.randint(1, 3), r.randint(1, 3))
        hw = (r.randint(1, 13), r.randint(1, 13))
        if any(window_count(hw[i], k[i], s[i], p[i], d[i]) < 1 for i in range(2)):
            continue
        batch = batches[len(cases) % len(batches)]
        layout = LAYOUTS[(len(cases) // len(batches)) % len(LAYOUTS)]
        channels = r.randint(1, 3)
        cases.append((batch, channels, hw, k, s, p, d, layout))
    return cases


SWEEP = _sweep(300, seed=20240611)


def _case_id(case):
    batch, channels, hw, k, s, p, d, layout = case
    b = "u" if batch is None else f"n{batch}"
    return f"{b}-c{channels}-{hw[0]}x{hw[1]}-k{k[0]}{k[1]}-s{s[0]}{s[1]}-p{p[0]}{p[1]}-d{d[0]}{d[1]}-{layout}"


def test_sweep_covers_the_product():
    """The sampled sweep really covers every value of every axis."""
    seen = {name: set() for name in ("batch", "kh", "kw", "s", "p", "d", "h", "w", "layout")}
    for batch, channels, hw, k, s, p, d, layout in SWEEP:
        seen["batch"].add(batch)
        seen["kh"].add(k[0])
        seen["kw"].add(k[1])
        seen["s"].update(s)
        seen["p"].update(p)
        seen["d"].update(d)
        seen["h"].add(hw[0])
        seen["w"].add(hw[1])
        seen["layout"].add(layout)
    assert seen["batch"] == {0, 1, 3, None}
    assert seen["kh"] == seen["kw"] == set(range(1, 6))
    assert seen["s"] == {1, 2, 3} and seen["d"] == {1, 2, 3} and seen["p"] == {0, 1, 2, 3}
    assert seen["h"] == seen["w"] == set(range(1, 14))
    assert seen["layout"] == set(LAYOUTS)
    assert any(k[0] != k[1] for _, _, _, k, *_ in SWEEP)


@pytest.mark.parametrize("case", SWEEP, ids=_case_id)
def test_im2col_col2im_match_torch_float64(case, rng):
    batch, channels, hw, k, s, p, d, layout = case
    shape = (channels,) + hw if batch is None else (batch, channels) + hw
    kwargs = dict(kernel_size=k, dilation=d, padding=p, stride=s)

    # --- im2col == F.unfold: output (a pure copy: bitwise) and input gradient.
    x = make_tensor(shape, rng, layout).detach().requires_grad_()
    x_before = x.detach().clone()
    ours = convt_ext.im2col(x, **kwargs)
    ref = F.unfold(x, **kwargs)
    assert ours.shape == ref.shape
    assert ours.dtype == torch.float64
    assert torch.equal(ours, ref)
    g = randn(ref.shape, rng)
    (gx_ours,) = torch.autograd.grad(ours, x, g)
    (gx_ref,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(gx_ours, gx_ref, rtol=1e-12, atol=1e-12)
    assert_unchanged(x_before, x.detach())

    # --- col2im == F.fold on columns of that shape, with a non-contiguous
    # layout of the columns too, and its gradient (an im2col).
    col_layout = layout if layout in ("contiguous", "transposed", "offset") else "sliced"
    c = make_tensor(ref.shape, rng, col_layout).detach().requires_grad_()
    c_before = c.detach().clone()
    ours = convt_ext.col2im(c, output_size=hw, **kwargs)
    ref = F.fold(c, output_size=hw, **kwargs)
    assert ours.shape == ref.shape == shape
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    g = make_tensor(ref.shape, rng, layout)
    (gc_ours,) = torch.autograd.grad(ours, c, g)
    (gc_ref,) = torch.autograd.grad(ref, c, g)
    assert torch.equal(gc_ours, gc_ref)
    assert_unchanged(c_before, c.detach())


def test_im2col_view_matches_im2col_across_the_sweep(rng):
    """im2col(x, k, d, p, s) == im2col_view(x padded by p, k, d, s).reshape(N, C*kh*kw, L)
    over the whole 2-d sweep (every batch and layout); with p = 0 the view is of x
    itself, sharing its memory."""
    computed = unpadded = 0
    for batch, channels, hw, k, s, p, d, layout in SWEEP:
        shape = (channels,) + hw if batch is None else (batch, channels) + hw
        x = make_tensor(shape, rng, layout)
        view = convt_ext.im2col_view(F.pad(x, (p[1], p[1], p[0], p[0])) if any(p) else x, k, d, s)
        want = F.unfold(x, k, d, p, s)
        assert view.shape == shape[:-2] + k + (window_count(hw[0], k[0], s[0], p[0], d[0]), window_count(hw[1], k[1], s[1], p[1], d[1]))
        assert torch.equal(view.reshape(want.shape), want)
        assert torch.equal(view.reshape(want.shape), convt_ext.im2col(x, k, d, p, s))
        if p == (0, 0):
            assert view.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
            unpadded += 1
        computed += batch != 0 and want.numel() > 0
    assert computed >= 200 and unpadded >= 5, (computed, unpadded)


@pytest.mark.parametrize("batch,channels", [(1, 1), (3, 2)])
@pytest.mark.parametrize("k,s,p,d", [((3, 3), (1, 1), (1, 1), (1, 1)),
                                     ((3, 4), (2, 3), (2, 0), (1, 2)),
                                     ((4, 2), (3, 2), (1, 3), (2, 1))])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_col2im_of_wide_images_matches_fold(batch, channels, k, s, p, d, layout, rng):
    # Rows of 1500 float64 values: the CPU col2im accumulates a few image rows
    # at a time (an L1-sized band), so these images are split into many bands,
    # and the parallel tasks start and end inside planes and bands.
    hw = (23, 1500)
    L = window_count(hw[0], k[0], s[0], p[0], d[0]) * window_count(hw[1], k[1], s[1], p[1], d[1])
    c = make_tensor((batch, channels * k[0] * k[1], L), rng, layout)
    kwargs = dict(kernel_size=k, dilation=d, padding=p, stride=s)
    ours = convt_ext.col2im(c, output_size=hw, **kwargs)
    torch.testing.assert_close(ours, F.fold(c, output_size=hw, **kwargs), rtol=1e-12, atol=1e-12)


def test_ops_take_lists(rng):
    """The dispatcher ops take their ints as lists of 2."""
    x = randn((2, 3, 9, 7), rng)
    torch.testing.assert_close(
        ops.im2col(x, [3, 2], [2, 1], [1, 0], [2, 3]),
        F.unfold(x, (3, 2), dilation=(2, 1), padding=(1, 0), stride=(2, 3)),
        rtol=0,
        atol=0,
    )
    c = randn((2, 12, 15), rng)
    torch.testing.assert_close(
        ops.col2im(c, [9, 7], [2, 2], [1, 1], [1, 0], [2, 2]),
        F.fold(c, (9, 7), (2, 2), dilation=1, padding=(1, 0), stride=2),
        rtol=1e-12,
        atol=1e-12,
    )


def test_int_and_pair_arguments_are_equivalent(rng):
    x = randn((1, 2, 8, 8), rng)
    a = convt_ext.im2col(x, 3, dilation=2, padding=1, stride=2)
    b = convt_ext.im2col(x, (3, 3), dilation=[2, 2], padding=(1, 1), stride=torch.Size([2, 2]))
    assert torch.equal(a, b)
    assert torch.equal(a, F.unfold(x, 3, dilation=2, padding=1, stride=2))


# ------------------------------------------------------------------ adjointness


@pytest.mark.parametrize("seed", range(40))
def test_adjoint_identity(seed):
    """<im2col(x), c> == <x, col2im(c)> to 1e-12 relative, in float64."""
    r = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    while True:
        k = (r.randint(1, 5), r.randint(1, 5))
        s = (r.randint(1, 4), r.randint(1, 4))
        p = (r.randint(0, 3), r.randint(0, 3))
        d = (r.randint(1, 3), r.randint(1, 3))
        hw = (r.randint(1, 16), r.randint(1, 16))
        if all(window_count(hw[i], k[i], s[i], p[i], d[i]) >= 1 for i in range(2)):
            break
    n, ch = r.randint(1, 3), r.randint(1, 4)
    x = randn((n, ch) + hw, gen)
    cols = convt_ext.im2col(x, k, d, p, s)
    c = randn(cols.shape, gen)
    lhs = (cols * c).sum().item()
    img = convt_ext.col2im(c, hw, k, d, p, s)
    assert img.shape == x.shape
    rhs = (x * img).sum().item()
    scale = (cols.abs() * c.abs()).sum().item()
    assert abs(lhs - rhs) <= 1e-12 * max(scale, 1e-300)
    # And the reference pair agrees with ours (so this is not a vacuous identity).
    ref = (F.unfold(x, k, d, p, s) * c).sum().item()
    assert abs(lhs - ref) <= 1e-12 * max(scale, 1e-300)


# ------------------------------------------------------------------ gradcheck

GRADCHECK_CASES = [
    # shape, kernel, dilation, padding, stride
    ((1, 1, 4, 4), (2, 2), (1, 1), (0, 0), (1, 1)),
    ((2, 2, 5, 4), (3, 2), (1, 1), (1, 0), (1, 1)),
    ((1, 2, 6, 7), (2, 3), (2, 1), (1, 2), (2, 1)),
    ((2, 1, 7, 5), (3, 3), (1, 2), (2, 1), (3, 2)),
    ((2, 3, 5), (2, 2), (2, 2), (1, 1), (2, 2)),  # unbatched
    ((1, 1, 3, 3), (1, 1), (1, 1), (3, 3), (1, 1)),  # padding > kernel
]


@pytest.mark.parametrize("shape,k,d,p,s", GRADCHECK_CASES)
def test_im2col_gradcheck(shape, k, d, p, s, rng):
    x = randn(shape, rng).requires_grad_()
    fn = lambda t: convt_ext.im2col(t, k, d, p, s)  # noqa: E731
    assert gradcheck(fn, (x,))
    assert gradgradcheck(fn, (x,))


@pytest.mark.parametrize("shape,k,d,p,s", GRADCHECK_CASES)
def test_col2im_gradcheck(shape, k, d, p, s, rng):
    hw = shape[-2:]
    cols_shape = F.unfold(torch.zeros(shape, dtype=torch.float64), k, d, p, s).shape
    c = randn(cols_shape, rng).requires_grad_()
    fn = lambda t: convt_ext.col2im(t, hw, k, d, p, s)  # noqa: E731
    assert gradcheck(fn, (c,))
    assert gradgradcheck(fn, (c,))


def test_double_backward_matches_torch(rng):
    """Second derivatives through im2col/col2im equal those through F.unfold/F.fold."""
    k, d, p, s = (3, 2), (1, 2), (1, 1), (2, 1)
    x = randn((2, 2, 7, 8), rng).requires_grad_()

    def loss(unfold, fold):
        cols = unfold(x, k, dilation=d, padding=p, stride=s)
        img = fold(cols.sin(), (7, 8), k, dilation=d, padding=p, stride=s)
        return (img**2).sum()

    def hvp(unfold, fold):
        (gx,) = torch.autograd.grad(loss(unfold, fold), x, create_graph=True)
        v = torch.ones_like(gx)
        (h,) = torch.autograd.grad((gx * v).sum(), x)
        return gx.detach(), h

    g1, h1 = hvp(convt_ext.im2col, convt_ext.col2im)
    g2, h2 = hvp(F.unfold, F.fold)
    torch.testing.assert_close(g1, g2, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(h1, h2, rtol=1e-11, atol=1e-11)


# ------------------------------------------------------------------ opcheck

OPCHECK_IM2COL = [
    ((2, 3, 6, 5), [2, 2], [1, 1], [0, 0], [1, 1]),
    ((1, 2, 7, 7), [3, 2], [2, 1], [1, 2], [2, 3]),
    ((2, 5, 4), [2, 3], [1, 1], [1, 1], [1, 2]),  # unbatched
    ((0, 2, 5, 5), [2, 2], [1, 1], [0, 0], [1, 1]),  # empty batch
]


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("shape,k,d,p,s", OPCHECK_IM2COL)
def test_opcheck_im2col(shape, k, d, p, s, requires_grad, rng):
    x = randn(shape, rng).requires_grad_(requires_grad)
    torch.library.opcheck(ops.im2col.default, (x, k, d, p, s))


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("shape,k,d,p,s", OPCHECK_IM2COL)
def test_opcheck_col2im(shape, k, d, p, s, requires_grad, rng):
    cols_shape = F.unfold(torch.zeros(shape), k, d, p, s).shape
    c = randn(cols_shape, rng).requires_grad_(requires_grad)
    torch.library.opcheck(ops.col2im.default, (c, list(shape[-2:]), k, d, p, s))


def test_fake_kernels_give_real_shapes(rng):
    """Under FakeTensorMode the registered fake kernels predict the real shapes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cases = [((2, 3, 9, 8), (3, 2), (2, 1), (1, 0), (2, 3)), ((4, 7, 7), (2, 2), (1, 1), (0, 0), (1, 1))]
    for shape, k, d, p, s in cases:
        ref = F.unfold(torch.zeros(shape), k, d, p, s)
        with FakeTensorMode():
            x = torch.empty(shape)
            cols = convt_ext.im2col(x, k, d, p, s)
            img = convt_ext.col2im(torch.empty(ref.shape), shape[-2:], k, d, p, s)
        assert tuple(cols.shape) == tuple(ref.shape)
        assert tuple(img.shape) == tuple(shape)


# ------------------------------------------------------------------ torch.compile


def _roundtrip(x, w):
    cols = convt_ext.im2col(x, (3, 2), dilation=(1, 2), padding=(1, 1), stride=(2, 1))
    cols = cols * w
    return convt_ext.col2im(cols, x.shape[-2:], (3, 2), dilation=(1, 2), padding=(1, 1), stride=(2, 1))


def _roundtrip_ref(x, w):
    cols = F.unfold(x, (3, 2), dilation=(1, 2), padding=(1, 1), stride=(2, 1))
    cols = cols * w
    return F.fold(cols, x.shape[-2:], (3, 2), dilation=(1, 2), padding=(1, 1), stride=(2, 1))


def _check_compiled(compiled, shapes, rng):
    for shape in shapes:
        x = randn(shape, rng).requires_grad_()
        w = randn(F.unfold(x.detach(), (3, 2), (1, 2), (1, 1), (2, 1)).shape[-2:], rng).requires_grad_()
        g = randn(shape, rng)
        y = compiled(x, w)
        gx, gw = torch.autograd.grad(y, (x, w), g)
        y_ref = _roundtrip_ref(x, w)
        gx_ref, gw_ref = torch.autograd.grad(y_ref, (x, w), g)
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gw, gw_ref, rtol=1e-12, atol=1e-12)
        # Also identical to our eager result.
        y_eager = _roundtrip(x, w)
        torch.testing.assert_close(y, y_eager, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph(backend, rng):
    torch._dynamo.reset()
    compiled = torch.compile(_roundtrip, fullgraph=True, backend=backend)
    _check_compiled(compiled, [(2, 3, 8, 7)], rng)


def test_compile_dynamic(rng):
    torch._dynamo.reset()
    compiled = torch.compile(_roundtrip, fullgraph=True, backend="aot_eager", dynamic=True)
    # Several sizes through the same (symbolic) graph.
    _check_compiled(compiled, [(2, 3, 8, 7), (3, 2, 10, 9), (1, 1, 5, 6)], rng)


# ------------------------------------------------------------------ dtypes

DTYPE_CASES = [
    ((2, 3, 9, 10), (3, 3), (1, 1), (1, 1), (1, 1)),  # 9 overlapping taps per pixel
    ((1, 2, 12, 11), (5, 4), (1, 2), (2, 3), (1, 1)),  # up to 20 taps per pixel
    ((3, 2, 8, 7), (2, 3), (2, 1), (0, 1), (2, 2)),
    ((4, 9, 9), (3, 2), (1, 1), (1, 0), (3, 1)),  # unbatched
]


@pytest.mark.parametrize("shape,k,d,p,s", DTYPE_CASES)
def test_float32_parity(shape, k, d, p, s, rng):
    x = make_tensor(shape, rng, "sliced", dtype=torch.float32)
    ours = convt_ext.im2col(x, k, d, p, s)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, F.unfold(x, k, d, p, s))
    c = randn(ours.shape, rng, torch.float32)
    ours = convt_ext.col2im(c, shape[-2:], k, d, p, s)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, F.fold(c, shape[-2:], k, d, p, s), rtol=1e-6, atol=1e-6)


def _ulp(t, dtype):
    """One unit in the last place of `dtype` at the magnitude of float32 `t`."""
    info = torch.finfo(dtype)
    mag = t.abs().clamp_min(info.tiny)
    return torch.exp2(torch.floor(torch.log2(mag))) * info.eps


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,k,d,p,s", DTYPE_CASES)
def test_half_precision_parity(shape, k, d, p, s, dtype, rng):
    # im2col copies: exactly F.unfold of the same values.
    x = make_tensor(shape, rng, "transposed", dtype=dtype)
    ours = convt_ext.im2col(x, k, d, p, s)
    assert ours.dtype == dtype
    assert torch.equal(ours, F.unfold(x.float(), k, d, p, s).to(dtype))
    # col2im accumulates in float32 and rounds once: within half an ulp (allow 1)
    # of F.fold computed in float32 on the same values.
    c = randn(ours.shape, rng, dtype)
    ours = convt_ext.col2im(c, shape[-2:], k, d, p, s)
    assert ours.dtype == dtype
    ref32 = F.fold(c.float(), shape[-2:], k, d, p, s)
    err = (ours.float() - ref32).abs()
    assert (err <= _ulp(ref32, dtype) + 1e-30).all(), float((err / _ulp(ref32, dtype)).max())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_col2im_accumulates_in_float32(dtype):
    """Each interior pixel sums one large tap (256, added first in (ki, kj)
    order) and 48 small ones, each below half an ulp of 256. Accumulating in
    the half type would drop every small tap; float32 accumulation keeps them
    (all partial sums are exact in float32)."""
    k, hw = (7, 7), (9, 9)
    small = 2.0**-4 if dtype == torch.float16 else 2.0**-1
    assert small < 256 * torch.finfo(dtype).eps / 2
    n_cols = F.unfold(torch.zeros(1, 1, *hw), k, padding=3).shape
    c = torch.full(n_cols, small, dtype=dtype)
    c[:, 0, :] = 256.0  # row (c=0, ki=0, kj=0) of every window position
    ours = convt_ext.col2im(c, hw, k, padding=3)
    ref = F.fold(c.float(), hw, k, padding=3).to(dtype)
    assert ref.max() == 256 + 48 * small  # the small taps do count
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_half_precision_gradients(dtype, rng):
    x = randn((2, 2, 7, 6), rng, dtype).requires_grad_()
    cols = convt_ext.im2col(x, (3, 2), padding=1)
    g = randn(cols.shape, rng, dtype)
    (gx,) = torch.autograd.grad(cols, x, g)
    assert gx.dtype == dtype
    ref = F.fold(g.float(), (7, 6), (3, 2), padding=1)
    tol = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-6}[dtype]
    torch.testing.assert_close(gx.float(), ref, rtol=tol, atol=tol)


# ------------------------------------------------------------------ inputs untouched


@pytest.mark.parametrize("layout", LAYOUTS)
def test_inputs_not_modified(layout, rng):
    x = make_tensor((2, 3, 8, 9), rng, layout)
    before = x.clone()
    stride_before, offset_before = x.stride(), x.storage_offset()
    cols = convt_ext.im2col(x, (3, 2), dilation=2, padding=1, stride=1)
    assert_unchanged(before, x)
    assert x.stride() == stride_before and x.storage_offset() == offset_before

    c = make_tensor(cols.shape, rng, layout if layout != "channels_last" else "sliced")
    c_before = c.clone()
    convt_ext.col2im(c, (8, 9), (3, 2), dilation=2, padding=1, stride=1)
    assert_unchanged(c_before, c)
    # Nor through autograd.
    xg = x.detach().requires_grad_()
    convt_ext.im2col(xg, (3, 2), 2, 1, 1).sum().backward()
    assert_unchanged(before, x)


def test_outputs_do_not_alias_inputs(rng):
    """A 1x1 kernel is an identity-like reshape: the result must still be new memory."""
    x = randn((1, 2, 4, 4), rng)
    cols = convt_ext.im2col(x, 1)
    assert torch.equal(cols, x.reshape(1, 2, 16))
    cols.zero_()
    assert x.abs().sum() > 0
    c = randn((1, 2, 16), rng)
    img = convt_ext.col2im(c, (4, 4), 1)
    assert torch.equal(img, c.reshape(1, 2, 4, 4))
    img.zero_()
    assert c.abs().sum() > 0


# ------------------------------------------------------------------ errors


def _x(*shape):
    return torch.zeros(shape)


IM2COL_ERRORS = [
    # (kwargs for convt_ext.im2col, exception, regex)
    (dict(input=_x(4), kernel_size=2), ValueError, r"input"),
    (dict(input=_x(1, 1, 1, 4, 4), kernel_size=2), ValueError, r"input"),
    (dict(input=_x(1, 1, 4, 4), kernel_size=0), ValueError, r"kernel_size"),
    (dict(input=_x(1, 1, 4, 4), kernel_size=(2, 0)), ValueError, r"kernel_size"),
    (dict(input=_x(1, 1, 4, 4), kernel_size=-1), ValueError, r"kernel_size"),
    (dict(input=_x(1, 1, 4, 4), kernel_size=2, stride=0), ValueError, r"stride"),
    (dict(input=_x(1, 1, 4, 4), kernel_size=2, stride=(1, -1)), ValueError, r"stride"),
    (dict(input=_x(1, 1, 4, 4), kernel_size=2, dilation=0), ValueError, r"dilation"),
    (dict(input=_x(1, 1, 4, 4), kernel_size=2, padding=-1), ValueError, r"padding"),
    (dict(input=_x(1, 1, 4, 4), kernel_size=2, padding=(0, -2)), ValueError, r"padding"),
    (dict(input=_x(1, 1, 4, 4), kernel_size=5), ValueError, r"input.*kernel_size"),
    (dict(input=_x(1, 1, 4, 4), kernel_size=3, dilation=2), ValueError, r"input.*kernel_size"),
    (dict(input=_x(2, 4, 4), kernel_size=(1, 6), padding=(0, 0)), ValueError, r"input.*kernel_size"),
    (dict(input=_x(1, 0, 4, 4), kernel_size=2), ValueError, r"input"),
    (dict(input=_x(1, 1, 0, 4), kernel_size=1), ValueError, r"input"),
    # Every bool, integer, floating and complex dtype is taken (tests/test_dtypes.py); packed
    # sub-byte types and raw bits are not.
    (dict(input=torch.zeros(1, 1, 4, 4, dtype=torch.float4_e2m1fn_x2), kernel_size=2), TypeError, r"input"),
    (dict(input=torch.zeros(1, 1, 4, 4, dtype=torch.bits8), kernel_size=2), TypeError, r"input"),
    (dict(input=[[[[1.0]]]], kernel_size=1), TypeError, r"input"),
    (dict(input=_x(1, 1, 4, 4), kernel_size=True), TypeError, r"kernel_size"),
    (dict(input=_x(1, 1, 4, 4), kernel_size=(2, False)), TypeError, r"kernel_size"),
    (dict(input=_x(1, 1, 4, 4), kernel_size="2"), TypeError, r"kernel_size"),
    (dict(input=_x(1, 1, 4, 4), kernel_size=2.0), TypeError, r"kernel_size"),
    # A 3-tuple makes the call 3-d (the 4-d input is then unbatched), a 1-tuple 1-d.
    (dict(input=_x(1, 1, 4, 4), kernel_size=(2, 2, 2)), ValueError, r"input.*kernel_size"),
    (dict(input=_x(1, 1, 4, 4), kernel_size=(2,)), ValueError, r"input.*kernel_size"),
    (dict(input=_x(1, 1, 4, 4), kernel_size=(2, 2), stride=(1, 1, 1)), ValueError, r"stride.*kernel_size"),
    (dict(input=_x(1, 1, 4, 4), kernel_size=None), TypeError, r"kernel_size"),
    (dict(input=_x(1, 1, 4, 4), kernel_size=2, stride=1.5), TypeError, r"stride"),
    (dict(input=_x(1, 1, 4, 4), kernel_size=2, stride=True), TypeError, r"stride"),
    (dict(input=_x(1, 1, 4, 4), kernel_size=2, padding="same"), TypeError, r"padding"),
    (dict(input=_x(1, 1, 4, 4), kernel_size=2, dilation=(1, 1.0)), TypeError, r"dilation"),
]


def _error_ids(table):
    return [f"{i}-{exc.__name__}-{re.sub(r'[^A-Za-z_]+', '_', match).strip('_')}" for i, (_, exc, match) in enumerate(table)]


@pytest.mark.parametrize("kwargs,exc,match", IM2COL_ERRORS, ids=_error_ids(IM2COL_ERRORS))
def test_im2col_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        convt_ext.im2col(**kwargs)


COL2IM_ERRORS = [
    # (kwargs for convt_ext.col2im, exception, regex)
    (dict(input=_x(12), output_size=(4, 4), kernel_size=2), ValueError, r"input"),
    (dict(input=_x(1, 1, 4, 9), output_size=(4, 4), kernel_size=2), ValueError, r"input"),
    # L must equal the window count (3*3 = 9 here).
    (dict(input=_x(1, 4, 8), output_size=(4, 4), kernel_size=2), ValueError, r"input.*\(L\)|\bL\b"),
    (dict(input=_x(4, 10), output_size=(4, 4), kernel_size=2), ValueError, r"input.*\(L\)|\bL\b"),
    (dict(input=_x(1, 4, 9), output_size=(4, 4), kernel_size=2, stride=2), ValueError, r"\bL\b"),
    # channels not divisible by kh*kw.
    (dict(input=_x(1, 5, 9), output_size=(4, 4), kernel_size=2), ValueError, r"kernel_size|C\*kh\*kw"),
    (dict(input=_x(6, 9), output_size=(4, 4), kernel_size=2), ValueError, r"kernel_size|C\*kh\*kw"),
    (dict(input=_x(1, 0, 9), output_size=(4, 4), kernel_size=2), ValueError, r"kernel_size|C\*kh\*kw"),
    (dict(input=_x(1, 4, 9), output_size=(4, 0), kernel_size=2), ValueError, r"output_size"),
    (dict(input=_x(1, 4, 9), output_size=(1, 1), kernel_size=2), ValueError, r"output_size.*kernel_size"),
    (dict(input=_x(1, 4, 9), output_size=(4, 4), kernel_size=0), ValueError, r"kernel_size"),
    (dict(input=_x(1, 4, 9), output_size=(4, 4), kernel_size=2, stride=0), ValueError, r"stride"),
    (dict(input=_x(1, 4, 9), output_size=(4, 4), kernel_size=2, dilation=0), ValueError, r"dilation"),
    (dict(input=_x(1, 4, 9), output_size=(4, 4), kernel_size=2, padding=-1), ValueError, r"padding"),
    # float8 has no sum (im2col copies it; col2im refuses it).
    (dict(input=torch.zeros(1, 4, 9, dtype=torch.float8_e4m3fn), output_size=(4, 4), kernel_size=2), TypeError, r"input"),
    (dict(input=_x(1, 4, 9), output_size=(4, 4), kernel_size=True), TypeError, r"kernel_size"),
    (dict(input=_x(1, 4, 9), output_size=(4, 4), kernel_size="2"), TypeError, r"kernel_size"),
    (dict(input=_x(1, 4, 9), output_size=(4, 4), kernel_size=2.0), TypeError, r"kernel_size"),
    (dict(input=_x(1, 4, 9), output_size=4.0, kernel_size=2), TypeError, r"output_size"),
    # Three output sizes make the call 3-d: 4 rows are not a multiple of 2*2*2.
    (dict(input=_x(1, 4, 9), output_size=(4, 4, 4), kernel_size=2), ValueError, r"kernel_size"),
    (dict(input=_x(1, 4, 9), output_size=(4, 4), kernel_size=2, stride="1"), TypeError, r"stride"),
]


@pytest.mark.parametrize("kwargs,exc,match", COL2IM_ERRORS, ids=_error_ids(COL2IM_ERRORS))
def test_col2im_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        convt_ext.col2im(**kwargs)


def test_error_cases_are_also_rejected_by_torch():
    """Sanity check of the error tables: each geometry-type case above is one
    that F.unfold / F.fold reject too (type errors aside)."""
    for kwargs, exc, _ in IM2COL_ERRORS:
        if exc is TypeError or not isinstance(kwargs["input"], torch.Tensor):
            continue
        if kwargs["input"].dim() in (3, 4) and 0 in kwargs["input"].shape[-3:]:
            continue  # torch's own rules for empty channels differ; ours are documented
        with pytest.raises((RuntimeError, ValueError, IndexError)):
            F.unfold(**kwargs)
    for kwargs, exc, _ in COL2IM_ERRORS:
        if exc is TypeError or 0 in kwargs["input"].shape:
            continue
        with pytest.raises((RuntimeError, ValueError, IndexError)):
            F.fold(**kwargs)


def test_ops_reject_bad_lists_with_named_argument():
    """The dispatcher ops check the geometry themselves (no Python wrapper)."""
    x = _x(1, 1, 4, 4)
    with pytest.raises(ValueError, match="stride"):
        ops.im2col(x, [2, 2], [1, 1], [0, 0], [0, 1])
    with pytest.raises(ValueError, match="padding"):
        ops.im2col(x, [2, 2], [1, 1], [-1, 0], [1, 1])
    with pytest.raises(ValueError, match="kernel_size"):
        ops.col2im(_x(1, 4, 9), [4, 4], [2, 0], [1, 1], [0, 0], [1, 1])
    with pytest.raises(ValueError, match="dilation"):
        ops.col2im(_x(1, 4, 9), [4, 4], [2, 2], [0, 1], [0, 0], [1, 1])


# ------------------------------------------------------------------ 64-bit indexing


def _expected_cols_entries(x, rows, positions, k, s, p, d, windows):
    """cols[0, rows, positions] by direct indexing of the (1, C, H, W) image x."""
    kh, kw = k
    OW = windows[1]
    kj = rows % kw
    ki = (rows // kw) % kh
    ch = rows // (kw * kh)
    ow = positions % OW
    oh = positions // OW
    ih = oh * s[0] - p[0] + ki * d[0]
    iw = ow * s[1] - p[1] + kj * d[1]
    H, W = x.shape[-2:]
    inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    vals = x[0, ch, ih.clamp(0, H - 1), iw.clamp(0, W - 1)]
    return torch.where(inside, vals, torch.zeros_like(vals)), inside


def _check_large(device, dtype):
    # (1, 1, 1405, 1405) with a 33x33 kernel and padding 16: 1089 rows of
    # 1405*1405 positions = 2,149,713,225 elements > 2**31 (4.3 GB in 16 bits).
    H = W = 1405
    k, s, p, d = (33, 33), (1, 1), (16, 16), (1, 1)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, 1, H, W, generator=gen).to(dtype).to(device)
    windows = (window_count(H, 33, 1, 16, 1), window_count(W, 33, 1, 16, 1))
    cols = convt_ext.im2col(x, k, d, p, s)
    L = windows[0] * windows[1]
    assert cols.shape == (1, 33 * 33, L)
    assert cols.numel() > 2**31

    # Sampled entries: random ones, ones whose flat offset is past 2**31 and
    # 2**32 (if any), and the very last rows/positions.
    g = torch.Generator().manual_seed(11)
    n = 400
    flat = torch.randint(0, cols.numel(), (n,), generator=g)
    past = torch.randint(2**31, cols.numel(), (n,), generator=g)
    edges = torch.tensor([0, 2**31 - 1, 2**31, 2**31 + 1, cols.numel() - 1, cols.numel() - L, 2**31 + L // 2])
    flat = torch.cat([flat, past, edges])
    rows, positions = flat // L, flat % L
    expected, inside = _expected_cols_entries(x.cpu(), rows, positions, k, s, p, d, windows)
    assert inside.sum() > n  # most samples are real pixels, not padding
    got = cols[0, rows.to(device), positions.to(device)].cpu()
    assert torch.equal(got, expected)

    # col2im of those columns: every pixel is x times its number of windows,
    # which is exact in a float32 accumulator (11-bit mantissa * <= 1089).
    img = convt_ext.col2im(cols, (H, W), k, d, p, s)
    del cols
    idx = torch.arange(H)
    count_h = (torch.clamp(idx + 16, max=32) - torch.clamp(idx + 17 - H, min=0) + 1).to(torch.float32)
    expected_img = (x.cpu().float() * count_h[:, None] * count_h[None, :]).to(dtype)
    sample = torch.randint(0, H * W, (2000,), generator=g)
    got_img = img.reshape(-1)[sample.to(device)].cpu()
    assert torch.equal(got_img, expected_img.reshape(-1)[sample])
    # Corners and centre exactly too.
    for i, j in [(0, 0), (H - 1, W - 1), (0, W - 1), (H // 2, W // 2), (H - 1, 0)]:
        assert torch.equal(img[0, 0, i, j].cpu(), expected_img[0, 0, i, j])


@pytest.mark.slow
def test_64bit_indexing_cpu():
    # About 10 s and 4.5 GB of memory on a 2-core CPU.
    _check_large("cpu", torch.float16)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.cuda
@requires_cuda
def test_64bit_indexing_cuda(dtype):
    free, _ = torch.cuda.mem_get_info()
    if free < 10 * 2**30:
        pytest.skip("needs ~10 GB of free GPU memory")
    _check_large("cuda", dtype)


# ------------------------------------------------------------------ CUDA

CUDA_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


# The CUDA tests' cases: the first 20 of the sweep with data (an empty batch computes nothing).
CUDA_SWEEP = [c for c in SWEEP if c[0] != 0][:20]


def test_cuda_sweep_has_data():
    assert len(CUDA_SWEEP) == 20 and all(c[0] != 0 for c in CUDA_SWEEP)
    assert {1, 3, None} <= {c[0] for c in CUDA_SWEEP}
    assert len({c[7] for c in CUDA_SWEEP}) >= 2  # memory layouts


@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("case", CUDA_SWEEP, ids=_case_id)
@pytest.mark.cuda
@requires_cuda
def test_cuda_matches_cpu(case, dtype):
    batch, channels, hw, k, s, p, d, layout = case
    gen = torch.Generator().manual_seed(zlib.crc32(_case_id(case).encode()))
    shape = (channels,) + hw if batch is None else (batch, channels) + hw
    x = make_tensor(shape, gen, layout, dtype=dtype)
    xc = make_tensor(shape, gen, layout, dtype=dtype, device="cuda")
    xc.copy_(x)
    cols = convt_ext.im2col(x, k, d, p, s)
    cols_c = convt_ext.im2col(xc, k, d, p, s)
    assert cols_c.device.type == "cuda"
    assert torch.equal(cols_c.cpu(), cols)
    assert torch.equal(cols, F.unfold(x.double(), k, d, p, s).to(dtype))
    c = randn(cols.shape, gen, dtype)
    img = convt_ext.col2im(c, hw, k, d, p, s)
    img_c = convt_ext.col2im(c.cuda(), hw, k, d, p, s)
    ref = F.fold(c.double(), hw, k, d, p, s)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(img_c.cpu().double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(img_c.cpu(), img, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.cuda
@requires_cuda
def test_cuda_col2im_deterministic(dtype):
    gen = torch.Generator().manual_seed(3)
    hw, k, d, p, s = (67, 53), (5, 4), (2, 1), (3, 2), (1, 1)
    n_cols = F.unfold(torch.zeros(1, 1, *hw), k, d, p, s).shape[-1]
    c = randn((4, 8 * 20, n_cols), gen, dtype, "cuda")
    first = convt_ext.col2im(c, hw, k, d, p, s)
    for _ in range(5):
        assert torch.equal(convt_ext.col2im(c, hw, k, d, p, s), first)
    x = randn((4, 8) + hw, gen, dtype, "cuda").requires_grad_()
    cols = convt_ext.im2col(x, k, d, p, s)
    g = torch.randn_like(cols)
    (g1,) = torch.autograd.grad(cols, x, g)
    (g2,) = torch.autograd.grad(convt_ext.im2col(x, k, d, p, s), x, g)
    assert torch.equal(g1, g2)


@pytest.mark.parametrize("shape,k,d,p,s", GRADCHECK_CASES)
@pytest.mark.cuda
@requires_cuda
def test_cuda_gradcheck(shape, k, d, p, s):
    gen = torch.Generator().manual_seed(5)
    x = randn(shape, gen, device="cuda").requires_grad_()
    f = lambda t: convt_ext.im2col(t, k, d, p, s)  # noqa: E731
    assert gradcheck(f, (x,)) and gradgradcheck(f, (x,))
    c = randn(F.unfold(torch.zeros(shape), k, d, p, s).shape, gen, device="cuda").requires_grad_()
    f = lambda t: convt_ext.col2im(t, shape[-2:], k, d, p, s)  # noqa: E731
    assert gradcheck(f, (c,)) and gradgradcheck(f, (c,))


# ------------------------------------------------------------------ out=


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_out_writes_torchs_result_into_the_callers_tensor(batched, layout, rng):
    """im2col(..., out=) and col2im(..., out=) write F.unfold's / F.fold's result into the
    given tensor (any strides), return that very tensor, and bump its version."""
    x = randn((2, 3, 9, 7), rng)
    x = x if batched else x[0]
    kw = dict(kernel_size=(3, 2), dilation=(1, 2), padding=1, stride=(2, 1))
    want = F.unfold(x, **kw)
    if layout == "transposed":
        cols = torch.full(want.shape[:-2] + want.shape[-2:][::-1], 7.0, dtype=want.dtype).transpose(-1, -2)
    else:
        cols = torch.full_like(want, 7.0)
    before = cols._version
    got = convt_ext.im2col(x, kw["kernel_size"], kw["dilation"], kw["padding"], kw["stride"], out=cols)
    assert got is cols and cols._version > before
    assert torch.equal(cols, want)
    image = torch.full_like(x, 7.0) if layout == "contiguous" else torch.full(x.shape[::-1], 7.0, dtype=x.dtype).permute(*reversed(range(x.dim())))
    got = convt_ext.col2im(want, (9, 7), kw["kernel_size"], kw["dilation"], kw["padding"], kw["stride"], out=image)
    assert got is image
    torch.testing.assert_close(image, F.fold(want, (9, 7), **kw), rtol=1e-12, atol=1e-12)


def test_out_is_checked_before_anything_is_written(rng):
    x = randn((2, 3, 6, 6), rng)
    want = F.unfold(x, 3)
    cases = [
        (torch.zeros(2, 27, 15, dtype=x.dtype), ValueError, "out must have shape"),
        (torch.zeros(want.shape, dtype=torch.float32), TypeError, "out must have the input's dtype"),
        (torch.zeros(1, dtype=x.dtype).expand(want.shape), ValueError, "overlap itself"),
        ("not a tensor", TypeError, "out must be a Tensor"),
    ]
    for out, error, message in cases:
        snapshot = out.clone() if isinstance(out, torch.Tensor) else None
        with pytest.raises(error, match=message):
            convt_ext.im2col(x, 3, out=out)
        if snapshot is not None:
            assert torch.equal(out, snapshot)
    image = randn((1, 4, 2, 2), rng)
    with pytest.raises(ValueError, match="share memory with input"):
        convt_ext.im2col(image, 1, out=image.view(1, 4, 4))


def test_out_has_no_gradient_and_compiles(rng):
    x = randn((2, 3, 6, 5), rng).requires_grad_(True)
    out = torch.empty(2, 12, 20, dtype=x.dtype)
    convt_ext.im2col(x, 2, out=out)
    assert not out.requires_grad  # as torch's out= functions: no graph through out
    f = torch.compile(lambda x, o: convt_ext.im2col(x, 2, out=o), backend="aot_eager", fullgraph=True)
    o = torch.zeros(2, 12, 20, dtype=x.dtype)
    f(x.detach(), o)
    assert torch.equal(o, F.unfold(x.detach(), 2))
    torch.library.opcheck(ops.im2col.out, (x.detach(), [2, 2], [1, 1], [0, 0], [1, 1]), {"out": torch.empty(2, 12, 20, dtype=x.dtype)})
    cols = F.unfold(x.detach(), 2)
    torch.library.opcheck(ops.col2im.out, (cols, [6, 5], [2, 2], [1, 1], [0, 0], [1, 1]), {"out": torch.empty(2, 3, 6, 5, dtype=x.dtype)})
