"""Drop-in guarantees beyond plain eager parity: autocast, channels_last, functorch
transforms and forward-mode AD, torch.export and TorchScript, and bitwise determinism
across thread counts.

Every expected value and every expected dtype / memory format comes from torch itself
(torch.nn.functional, torch.nn.grad, torch.nn modules, or torch's behaviour under the same
transform / autocast / memory format), usually in float64, never from convt_ext.

Torch behaviour these tests pin down (torch 2.13, CPU), which convt_ext follows:

- autocast: F.conv*/F.conv_transpose* are lower-precision ops (float32 tensors are cast to
  the autocast dtype, also a float32 weight with a low-precision input); float64 tensors are
  left alone. F.unfold / F.fold and torch.nn.grad.conv*_weight are not autocast ops: they
  return their input's dtype.
- memory format: the output and the input/weight gradients of a convolution are
  channels_last when the input or the weight is, except 3-d float64 (torch's slow path),
  where all are contiguous. The tests compare against torch's actual result in each case.
- torch's own CPU convolution is NOT bitwise reproducible across thread counts (its weight
  and bias gradients change with torch.set_num_threads); convt_ext's must be.
"""
import itertools
import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.func import hessian, jacfwd, jacrev, jvp, vmap

import convt_ext
from convt_ext import nn as cnn
from conftest import assert_unchanged, randn, requires_cuda

# torch.nn's reference modules warn about 'same' padding with even kernels.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")

DT = torch.float64
LOWP = [torch.bfloat16, torch.float16]
# Largest error allowed under autocast, relative to the largest magnitude of the exact
# (float64) result of the cast inputs: a few roundings of the low-precision type.
LOWP_TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}
CL = {2: torch.channels_last, 3: torch.channels_last_3d}

TORCH_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
TORCH_CONVT = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
TORCH_WEIGHT = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}
OURS_CONV = {1: convt_ext.conv1d, 2: convt_ext.conv2d, 3: convt_ext.conv3d}
OURS_CONVT = {1: convt_ext.conv_transpose1d, 2: convt_ext.conv_transpose2d, 3: convt_ext.conv_transpose3d}
OURS_WEIGHT = {1: convt_ext.conv1d_weight, 2: convt_ext.conv2d_weight, 3: convt_ext.conv3d_weight}
TORCH_MOD = {
    ("conv", 1): torch.nn.Conv1d, ("conv", 2): torch.nn.Conv2d, ("conv", 3): torch.nn.Conv3d,
    ("convt", 1): torch.nn.ConvTranspose1d, ("convt", 2): torch.nn.ConvTranspose2d, ("convt", 3): torch.nn.ConvTranspose3d,
}
OURS_MOD = {
    ("conv", 1): cnn.Conv1d, ("conv", 2): cnn.Conv2d, ("conv", 3): cnn.Conv3d,
    ("convt", 1): cnn.ConvTranspose1d, ("convt", 2): cnn.ConvTranspose2d, ("convt", 3): cnn.ConvTranspose3d,
}


def close64(got, want, rtol=1e-9, atol=1e-10):
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert got.shape == want.shape, (tuple(got.shape), tuple(want.shape))
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def close_lowp(got, exact, dtype):
    """got (low precision) against the float64 result of the same (cast) inputs."""
    assert got.shape == exact.shape
    scale = exact.abs().max().item()
    assert scale > 0
    err = (got.double() - exact).abs().max().item()
    assert err <= LOWP_TOL[dtype] * scale, (err, scale, dtype)


def nonzero(t):
    assert t is not None and t.numel() > 0 and t.abs().sum().item() > 0
    return t


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread for the tiny ops here (the determinism tests set their own
    thread counts); restores the caller's count."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ------------------------------------------------------------------ torch references for im2col/col2im in any D


def ref_im2col(x, kernel_size, dilation, padding, stride):
    """im2col from torch ops only, for any D and composable with every torch.func transform:
    channel c*K + j of F.convNd(x, one-hot weight, groups=C) is input channel c at the flat
    (row-major) kernel offset j of each window. (N, C, *S) -> (N, C*K, L); (C, *S) -> (C*K, L)."""
    D = len(kernel_size)
    unbatched = x.dim() == D + 1
    if unbatched:
        x = x.unsqueeze(0)
    n, c = x.shape[:2]
    K = math.prod(kernel_size)
    weight = torch.eye(K, dtype=x.dtype).reshape((K, 1) + tuple(kernel_size)).repeat((c, 1) + (1,) * D)
    y = TORCH_CONV[D](x, weight, None, stride, padding, dilation, c)
    y = y.reshape(n, c * K, -1)
    return y[0] if unbatched else y


def _windows(size, k, s, p, d):
    return [(size[i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(len(k))]


def ref_col2im(cols, output_size, kernel_size, dilation, padding, stride):
    """col2im (the adjoint of ref_im2col) from torch ops only: the transposed one-hot
    grouped convolution, with the output_padding that reaches output_size."""
    D = len(kernel_size)
    unbatched = cols.dim() == 2
    if unbatched:
        cols = cols.unsqueeze(0)
    K = math.prod(kernel_size)
    n, c = cols.shape[0], cols.shape[1] // K
    win = _windows(output_size, kernel_size, stride, padding, dilation)
    natural = [(win[i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (kernel_size[i] - 1) + 1 for i in range(D)]
    output_padding = [output_size[i] - natural[i] for i in range(D)]
    assert all(0 <= output_padding[i] < max(stride[i], dilation[i]) for i in range(D))
    weight = torch.eye(K, dtype=cols.dtype).reshape((K, 1) + tuple(kernel_size)).repeat((c, 1) + (1,) * D)
    y = TORCH_CONVT[D](cols.reshape(n, c * K, *win), weight, None, stride, padding, output_padding, c, dilation)
    assert tuple(y.shape[2:]) == tuple(output_size)
    return y[0] if unbatched else y


def _unfold3d_views(x, k, p, s):
    """3-d im2col through Tensor.unfold (dilation 1), only to validate ref_im2col."""
    xp = F.pad(x, [v for i in reversed(range(3)) for v in (p[i], p[i])])
    u = xp.unfold(2, k[0], s[0]).unfold(3, k[1], s[1]).unfold(4, k[2], s[2])
    n, c = x.shape[:2]
    return u.permute(0, 1, 5, 6, 7, 2, 3, 4).reshape(n, c * math.prod(k), -1)


def test_references_are_torchs_unfold_and_fold(rng):
    # 2-d: exactly F.unfold / F.fold.
    x = randn((2, 3, 7, 6), rng)
    geo = ((3, 2), (1, 2), (1, 0), (2, 1))
    want = F.unfold(x, *geo)
    assert torch.equal(ref_im2col(x, *geo), want)
    assert torch.equal(ref_im2col(x[0], *geo), want[0])
    cols = randn(want.shape, rng)
    close64(ref_col2im(cols, (7, 6), *geo), F.fold(cols, (7, 6), *geo))
    close64(ref_col2im(cols[1], (7, 6), *geo), F.fold(cols[1], (7, 6), *geo))
    # 1-d: F.unfold of a (N, C, 1, L) image.
    x1 = randn((2, 3, 9), rng)
    got = ref_im2col(x1, (3,), (2,), (1,), (2,))
    assert torch.equal(got, F.unfold(x1.unsqueeze(2), (1, 3), (1, 2), (0, 1), (1, 2)))
    c1 = randn(got.shape, rng)
    close64(ref_col2im(c1, (9,), (3,), (2,), (1,), (2,)),
            F.fold(c1, (1, 9), (1, 3), (1, 2), (0, 1), (1, 2)).squeeze(2))
    # 3-d: strided window views of the padded image; col2im is its adjoint.
    x3 = randn((2, 2, 5, 4, 4), rng)
    geo3 = ((2, 3, 2), (1, 1, 1), (1, 0, 1), (2, 1, 1))
    got3 = ref_im2col(x3, *geo3)
    assert torch.equal(got3, _unfold3d_views(x3, geo3[0], geo3[2], geo3[3]))
    c3 = randn(got3.shape, rng)
    lhs = (got3 * c3).sum()
    rhs = (x3 * ref_col2im(c3, (5, 4, 4), *geo3)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ 1. autocast

# (kind, D, input shape, weight shape, kwargs); bias has 6 channels everywhere.
AUTOCAST_CASES = [
    ("conv", 1, (2, 4, 11), (6, 2, 3), dict(stride=2, padding=1, groups=2)),
    ("conv", 2, (2, 4, 9, 8), (6, 2, 3, 3), dict(stride=2, padding=1, groups=2)),
    ("conv", 3, (2, 4, 5, 4, 4), (6, 2, 3, 3, 3), dict(stride=2, padding=1, groups=2)),
    ("convt", 1, (2, 4, 6), (4, 3, 3), dict(stride=2, padding=1, output_padding=1, groups=2)),
    ("convt", 2, (2, 4, 5, 4), (4, 3, 3, 3), dict(stride=2, padding=1, output_padding=1, groups=2)),
    ("convt", 3, (2, 4, 3, 3, 3), (4, 3, 3, 3, 3), dict(stride=2, padding=1, output_padding=1, groups=2)),
]
AUTOCAST_IDS = [f"{k}{d}d" for k, d, *_ in AUTOCAST_CASES]


def _fns(kind, D):
    return (OURS_CONV[D], TORCH_CONV[D]) if kind == "conv" else (OURS_CONVT[D], TORCH_CONVT[D])


@pytest.mark.parametrize("lowp", LOWP, ids=str)
@pytest.mark.parametrize("mixed", [False, True], ids=["fp32", "lowp_input"])
@pytest.mark.parametrize("case", AUTOCAST_CASES, ids=AUTOCAST_IDS)
def test_autocast_functional_dtype_and_values(case, mixed, lowp, rng):
    """float32 input/weight/bias (or a low-precision input with float32 weight and bias)
    under CPU autocast: the result has torch's dtype (the autocast dtype), and values close
    to the float64 result of the cast inputs."""
    kind, D, xs, ws, kw = case
    ours, ref = _fns(kind, D)
    x = randn(xs, rng, torch.float32)
    if mixed:
        x = x.to(lowp)
    w, b = randn(ws, rng, torch.float32), randn((6,), rng, torch.float32)
    originals = [t.clone() for t in (x, w, b)]
    with torch.autocast("cpu", dtype=lowp):
        want = ref(x, w, b, **kw)
        got = ours(x, w, b, **kw)
    assert want.dtype == lowp  # torch's rule, which convt_ext follows
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    exact = ref(*(t.to(lowp).double() for t in (x, w, b)), **kw)
    close_lowp(want, exact, lowp)  # the tolerance holds for torch itself
    close_lowp(got, exact, lowp)
    for before, after in zip(originals, (x, w, b)):
        assert_unchanged(before, after)


@pytest.mark.parametrize("lowp", LOWP, ids=str)
@pytest.mark.parametrize("case", AUTOCAST_CASES, ids=AUTOCAST_IDS)
def test_autocast_modules_forward_and_backward(case, lowp, rng):
    """convt_ext.nn modules (float32 parameters) under autocast: output dtype as torch's
    module, values close; backward gives float32 gradients for the float32 input and
    parameters (the parameters' dtype), close to torch's under the same autocast."""
    kind, D, xs, ws, kw = case
    in_ch, out_ch = (xs[1], ws[0]) if kind == "conv" else (xs[1], ws[1] * kw["groups"])
    torch.manual_seed(0)
    ref = TORCH_MOD[kind, D](in_ch, out_ch, ws[2:], **kw)
    ours = OURS_MOD[kind, D].from_torch(ref)
    x = randn(xs, rng, torch.float32)
    results = []
    for mod in (ref, ours):
        xl = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=lowp):
            out = mod(xl)
        up = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
        grads = torch.autograd.grad((out.float() * up).sum(), [xl] + list(mod.parameters()))
        results.append((out, grads))
    (want, want_grads), (got, got_grads) = results
    assert want.dtype == lowp
    assert got.dtype == want.dtype and got.shape == want.shape
    with torch.no_grad():
        exact = _fns(kind, D)[1](*(t.to(lowp).double() for t in (x, ref.weight, ref.bias)), **kw)
    close_lowp(got, exact, lowp)
    params = [x] + list(ours.parameters())
    for g, e, p in zip(got_grads, want_grads, params):
        assert g.dtype == p.dtype == torch.float32
        assert e.dtype == torch.float32
        close_lowp(g, nonzero(e).double(), lowp)


@pytest.mark.parametrize("lowp", LOWP, ids=str)
@pytest.mark.parametrize("case", AUTOCAST_CASES, ids=AUTOCAST_IDS)
def test_autocast_leaves_float64_alone(case, lowp, rng):
    """Autocast does not touch float64: the result is float64 and equals eager float64."""
    kind, D, xs, ws, kw = case
    ours, ref = _fns(kind, D)
    x, w, b = randn(xs, rng), randn(ws, rng), randn((6,), rng)
    with torch.autocast("cpu", dtype=lowp):
        want = ref(x, w, b, **kw)
        got = ours(x, w, b, **kw)
    assert want.dtype == torch.float64
    close64(got, want)
    close64(got, ref(x, w, b, **kw))


@pytest.mark.parametrize("lowp", LOWP, ids=str)
@pytest.mark.parametrize("in_dtype", ["float32", "lowp"])
@pytest.mark.parametrize("D", [1, 2, 3])
def test_autocast_im2col_col2im_keep_input_dtype(D, in_dtype, lowp, rng):
    """im2col/col2im (and nn.Unfold/Fold) are not autocast ops, like F.unfold/F.fold:
    the result has the input's dtype, under autocast as outside it."""
    dtype = torch.float32 if in_dtype == "float32" else lowp
    geo = {1: ((3,), (1,), (1,), (2,)), 2: ((3, 2), (1, 2), (1, 0), (2, 1)), 3: ((2, 2, 2), (1, 1, 1), (1, 0, 1), (2, 1, 1))}[D]
    size = {1: (9,), 2: (7, 6), 3: (4, 3, 4)}[D]
    x = randn((2, 3) + size, rng, dtype)
    with torch.autocast("cpu", dtype=lowp):
        got = convt_ext.im2col(x, *geo)
        got_mod = cnn.Unfold(*geo)(x)
        if D == 2:
            torch_unfold = F.unfold(x, *geo)
            torch_fold = F.fold(torch_unfold, size, *geo)
            assert torch_unfold.dtype == torch_fold.dtype == dtype  # torch's rule
    assert got.dtype == got_mod.dtype == dtype
    want = ref_im2col(x.double(), *geo)
    assert torch.equal(got.double(), want) and torch.equal(got_mod.double(), want)  # im2col only copies
    cols = randn(want.shape, rng, dtype)
    with torch.autocast("cpu", dtype=lowp):
        back = convt_ext.col2im(cols, size, *geo)
        back_mod = cnn.Fold(size, *geo)(cols)
    assert back.dtype == back_mod.dtype == dtype
    exact = ref_col2im(cols.double(), size, *geo)
    tol = 1e-6 if dtype == torch.float32 else LOWP_TOL[dtype]
    for t in (back, back_mod):
        assert (t.double() - exact).abs().max().item() <= tol * exact.abs().max().item()


@pytest.mark.parametrize("lowp", LOWP, ids=str)
@pytest.mark.parametrize("D", [1, 2, 3])
def test_autocast_conv_weight_follows_torch_nn_grad(D, lowp, rng):
    """torch.nn.grad.conv*_weight is not an autocast op (float32 in, float32 out);
    convt_ext.conv*_weight gives the same dtype and values."""
    kw = dict(stride=2, padding=1, dilation=1, groups=2)
    size = {1: (9,), 2: (7, 6), 3: (5, 4, 4)}[D]
    ws = (6, 2) + (3,) * D
    x = randn((2, 4) + size, rng, torch.float32)
    dy = randn((2, 6) + tuple(_windows(size, ws[2:], (2,) * D, (1,) * D, (1,) * D)), rng, torch.float32)
    with torch.autocast("cpu", dtype=lowp):
        want = TORCH_WEIGHT[D](x, ws, dy, **kw)
        got = OURS_WEIGHT[D](x, ws, dy, **kw)
    assert got.dtype == want.dtype
    close_lowp(got, TORCH_WEIGHT[D](x.double(), ws, dy.double(), **kw), lowp)


def _encoder_decoder(mods, dtype=torch.float32):
    torch.manual_seed(0)
    conv, convt = mods
    return torch.nn.Sequential(
        conv(3, 8, 3, stride=2, padding=1, dtype=dtype),
        torch.nn.ReLU(),
        convt(8, 3, 3, stride=2, padding=1, output_padding=1, dtype=dtype),
    )


@pytest.mark.parametrize("where", ["outside", "inside"])
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_autocast_under_torch_compile(backend, where, rng):
    """torch.compile(fullgraph=False) of a convt_ext model under autocast (entered outside
    the compiled function, or inside it): the output dtype is torch's model's, and values
    are close; the backward gives float32 parameter gradients."""
    torch._dynamo.reset()
    ref = _encoder_decoder((torch.nn.Conv2d, torch.nn.ConvTranspose2d))
    ours = _encoder_decoder((cnn.Conv2d, cnn.ConvTranspose2d))
    ours.load_state_dict(ref.state_dict())
    x = randn((2, 3, 8, 8), rng, torch.float32)

    def run(model, inp):
        if where == "inside":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model(inp)
        return model(inp)

    compiled = torch.compile(lambda inp: run(ours, inp), backend=backend, fullgraph=False)
    if where == "outside":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = run(ref, x)
            got = compiled(x)
    else:
        want = run(ref, x)
        got = compiled(x)
    assert want.dtype == torch.bfloat16
    assert got.dtype == want.dtype and got.shape == want.shape
    close_lowp(got, nonzero(want.double()), torch.bfloat16)
    got.float().sum().backward()
    for p in ours.parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32
        nonzero(p.grad)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("lowp", LOWP, ids=str)
@pytest.mark.parametrize("case", AUTOCAST_CASES, ids=AUTOCAST_IDS)
def test_autocast_cuda_lowp_input_fp32_weight(case, lowp, rng):
    """CUDA autocast with a float16/bfloat16 input and float32 weight and bias: torch's
    dtype and values close to the float64 result of the cast inputs; float32 gradients."""
    kind, D, xs, ws, kw = case
    ours, ref = _fns(kind, D)
    x = randn(xs, rng, lowp, "cuda").requires_grad_(True)
    w = randn(ws, rng, torch.float32, "cuda").requires_grad_(True)
    b = randn((6,), rng, torch.float32, "cuda").requires_grad_(True)
    with torch.autocast("cuda", dtype=lowp):
        want = ref(x, w, b, **kw)
        got = ours(x, w, b, **kw)
    assert got.dtype == want.dtype == lowp
    exact = ref(*(t.detach().to(lowp).double().cpu() for t in (x, w, b)), **kw)
    close_lowp(got.cpu(), exact, lowp)
    gx, gw, gb = torch.autograd.grad(got.float().sum(), (x, w, b))
    assert gx.dtype == lowp and gw.dtype == gb.dtype == torch.float32


# ------------------------------------------------------------------ 2. channels_last


def _formats(t, D):
    return (t.is_contiguous(), t.is_contiguous(memory_format=CL[D]))


def _strides(t):
    """t's strides where they mean something: a size-1 dimension's stride is arbitrary
    (torch itself gives a 1x1 weight gradient either layout's, path by path)."""
    return tuple(st if n != 1 else None for n, st in zip(t.shape, t.stride()))


@pytest.mark.parametrize("which", ["input", "weight", "both", "neither"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kind", ["conv", "convt"])
@pytest.mark.parametrize("D", [2, 3])
@pytest.mark.parametrize("geometry", ["3-stride2", "1x1"])
def test_channels_last_output_and_gradient_formats(geometry, D, kind, dtype, which, rng):
    """Input and/or weight in channels_last(_3d): output, input gradient and weight
    gradient have torch's strides (torch's actual result for the same tensors; for every
    upstream-gradient layout), with the same values; the caller's tensors are unchanged
    (values and strides). 1x1 layers take convt_ext's pixel-row GEMMs."""
    ours, ref = _fns(kind, D)
    size = (6, 5) if D == 2 else (5, 4, 3)
    k = (3 if geometry == "3-stride2" else 1,) * D
    for groups in (1, 2):
        x = randn((2, 4) + size, rng, dtype)
        w = randn(((6, 4 // groups) if kind == "conv" else (4, 6 // groups)) + k, rng, dtype)
        b = randn((6,), rng, dtype)
        if which in ("input", "both"):
            x = x.contiguous(memory_format=CL[D])
        if which in ("weight", "both"):
            w = w.contiguous(memory_format=CL[D])
        kw = dict(stride=2, padding=1, groups=groups) if geometry == "3-stride2" else dict(groups=groups)
        if kind == "convt" and geometry == "3-stride2":
            kw["output_padding"] = 1
        saved = [(t.clone(), t.stride()) for t in (x, w, b)]
        leaves = [t.requires_grad_(True) for t in (x, w, b)]
        want = ref(*leaves, **kw)
        got = ours(*leaves, **kw)
        assert want.is_contiguous() != want.is_contiguous(memory_format=CL[D])  # the shapes tell them apart
        assert _formats(got, D) == _formats(want, D), (which, groups, _formats(got, D), _formats(want, D), want.stride(), x.stride(), w.stride())
        assert _strides(got) == _strides(want)
        if dtype == torch.float64:
            close64(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for up in (randn(want.shape, rng, dtype), randn(want.shape, rng, dtype).contiguous(memory_format=CL[D])):
            want_g = torch.autograd.grad(want, leaves, up, retain_graph=True)
            got_g = torch.autograd.grad(got, leaves, up, retain_graph=True)
            for name, g, e in zip(("input", "weight", "bias"), got_g, want_g):
                assert _formats(g, D) == _formats(e, D), (name, which, _formats(g, D), _formats(e, D))
                assert _strides(g) == _strides(e), (name, g.stride(), e.stride())
                if dtype == torch.float64:
                    close64(g, e)
                else:
                    torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
        for (before, stride), after in zip(saved, (x, w, b)):
            assert_unchanged(before, after.detach())
            assert after.stride() == stride


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kind", ["conv", "convt"])
@pytest.mark.parametrize("D", [2, 3])
def test_channels_last_modules(D, kind, dtype, rng):
    """model.to(memory_format=channels_last) with a channels_last input, the usual recipe:
    convt_ext.nn gives the memory format, values and parameter-gradient formats of torch.nn."""
    torch.manual_seed(0)
    kw = dict(stride=2, padding=1, groups=2) if kind == "conv" else dict(stride=2, padding=1, output_padding=1, groups=2)
    ref = TORCH_MOD[kind, D](4, 6, 3, dtype=dtype, **kw).to(memory_format=CL[D])
    ours = OURS_MOD[kind, D].from_torch(ref).to(memory_format=CL[D])
    size = (6, 5) if D == 2 else (5, 4, 3)
    x = randn((2, 4) + size, rng, dtype).contiguous(memory_format=CL[D])
    want, got = ref(x), ours(x)
    assert _formats(got, D) == _formats(want, D)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    want.sum().backward()
    got.sum().backward()
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert _formats(p.grad, D) == _formats(q.grad, D)
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ 3. functorch and forward-mode AD

# One geometry per D: stride, padding and dilation differ across dimensions, groups=2.
GEOM = {
    1: dict(S=(7,), St=(4,), k=(3,), stride=(2,), padding=(1,), dilation=(1,), output_padding=(1,)),
    2: dict(S=(5, 4), St=(3, 3), k=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), output_padding=(1, 0)),
    3: dict(S=(4, 3, 3), St=(2, 2, 2), k=(2, 2, 2), stride=(2, 1, 1), padding=(1, 0, 1), dilation=(1, 1, 2),
            output_padding=(1, 0, 0)),
}


class Case:
    """One op at one geometry: ours and torch's as functions of the same tensors."""

    def __init__(self, name, ours, ref, shapes, unbatched=True, bias=False):
        self.name, self.ours, self.ref, self.shapes = name, ours, ref, shapes
        self.unbatched = unbatched  # the op takes an unbatched sample (vmap over N)
        self.bias = bias  # the last tensor is a bias

    def tensors(self, gen):
        return [randn(s, gen) for s in self.shapes]


def _make_cases():
    cases = []
    for D in (1, 2, 3):
        g = GEOM[D]
        k, s, p, d, op = g["k"], g["stride"], g["padding"], g["dilation"], g["output_padding"]
        conv_kw = dict(stride=s, padding=p, dilation=d, groups=2)
        out = tuple(_windows(g["S"], k, s, p, d))
        cases.append(Case(
            f"conv{D}d",
            lambda x, w, b, D=D, kw=conv_kw: OURS_CONV[D](x, w, b, **kw),
            lambda x, w, b, D=D, kw=conv_kw: TORCH_CONV[D](x, w, b, **kw),
            [(2, 4) + g["S"], (4, 2) + k, (4,)], bias=True))
        convt_kw = dict(stride=s, padding=p, output_padding=op, groups=2, dilation=d)
        cases.append(Case(
            f"conv_transpose{D}d",
            lambda x, w, b, D=D, kw=convt_kw: OURS_CONVT[D](x, w, b, **kw),
            lambda x, w, b, D=D, kw=convt_kw: TORCH_CONVT[D](x, w, b, **kw),
            [(2, 4) + g["St"], (4, 1) + k, (2,)], bias=True))
        wsize = (4, 2) + k
        cases.append(Case(
            f"conv{D}d_weight",
            lambda x, dy, D=D, ws=wsize, kw=conv_kw: OURS_WEIGHT[D](x, ws, dy, **kw),
            lambda x, dy, D=D, ws=wsize, kw=conv_kw: TORCH_WEIGHT[D](x, ws, dy, **kw),
            [(2, 4) + g["S"], (2, 4) + out], unbatched=False))
        geo = (k, d, p, s)
        cases.append(Case(
            f"im2col{D}d",
            lambda x, geo=geo: convt_ext.im2col(x, *geo),
            lambda x, geo=geo: ref_im2col(x, *geo),
            [(2, 2) + g["S"]]))
        size = g["S"]
        cases.append(Case(
            f"col2im{D}d",
            lambda c, geo=geo, size=size: convt_ext.col2im(c, size, *geo),
            lambda c, geo=geo, size=size: ref_col2im(c, size, *geo),
            [(2, 2 * math.prod(k), math.prod(out))]))
    return cases


CASES = _make_cases()
CASE_IDS = [c.name for c in CASES]


def _vmap_variants():
    """(case, name, in_dims, out_dims) for every way of batching each case's tensors."""
    params = []
    for c in CASES:
        n = len(c.shapes)
        variants = [("input", (0,) + (None,) * (n - 1), 0)]
        if n >= 2:
            variants.append(("second", (None, 0) + (None,) * (n - 2), 0))
            variants.append(("all", (0,) * n, 0))
        # Batch dimensions other than 0 (the last one for 1-d tensors), and out_dims=1.
        variants.append(("dims", tuple(min(2, len(s)) if i else 1 for i, s in enumerate(c.shapes)), 1))
        if c.bias:
            variants.append(("bias", (None,) * (n - 1) + (0,), 0))
        if c.unbatched:
            variants.append(("unbatched", "unbatched", 0))
        for name, in_dims, out_dims in variants:
            params.append(pytest.param(c, in_dims, out_dims, id=f"{c.name}-{name}"))
    return params


B = 3


@pytest.mark.parametrize("case, in_dims, out_dims", _vmap_variants())
def test_vmap(case, in_dims, out_dims, rng):
    """torch.func.vmap over every op, batching each tensor argument (alone and together,
    at dims other than 0, with out_dims other than 0) and, for the ops that take an
    unbatched sample, over the samples of the batch: equal to a loop of torch's op."""
    args = case.tensors(rng)
    if in_dims == "unbatched":
        in_dims = (0,) + (None,) * (len(args) - 1)  # the first tensor's N is the vmapped dim
    else:
        args = [randn(s[:d] + (B,) + s[d:], rng) if d is not None else randn(s, rng)
                for s, d in zip(case.shapes, in_dims)]
    size = next(a.shape[d] for a, d in zip(args, in_dims) if d is not None)
    want = torch.stack(
        [case.ref(*(a.select(d, i) if d is not None else a for a, d in zip(args, in_dims))) for i in range(size)],
        dim=out_dims,
    )
    got = vmap(case.ours, in_dims=in_dims, out_dims=out_dims)(*args)
    close64(got, nonzero(want))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_vmap_uses_a_batching_rule_not_the_fallback(case, rng):
    """vmap of every op runs a batching rule, not functorch's slow per-sample fallback:
    it still works with the fallback switched off (then a missing rule is an error)."""
    args = [randn((B,) + s, rng) for s in case.shapes]
    want = torch.stack([case.ref(*(a[i] for a in args)) for i in range(B)])
    old = torch._C._functorch._is_vmap_fallback_enabled()
    torch._C._functorch._set_vmap_fallback_enabled(False)
    try:
        got = vmap(case.ours)(*args)
    finally:
        torch._C._functorch._set_vmap_fallback_enabled(old)
    close64(got, nonzero(want))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_jvp(case, rng):
    """torch.func.jvp with non-zero tangents for every tensor argument: torch's primal
    output and tangent."""
    primals = case.tensors(rng)
    tangents = case.tensors(rng)
    out, tan = jvp(case.ours, tuple(primals), tuple(tangents))
    want_out, want_tan = jvp(case.ref, tuple(primals), tuple(tangents))
    close64(out, want_out)
    close64(tan, nonzero(want_tan))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_ad_dual_numbers(case, rng):
    """Plain forward-mode AD (torch.autograd.forward_ad): the output's tangent is torch's
    (not None, not zero)."""
    primals = case.tensors(rng)
    tangents = case.tensors(rng)
    results = []
    for fn in (case.ours, case.ref):
        with fwAD.dual_level():
            duals = [fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]
            out = fwAD.unpack_dual(fn(*duals))
            results.append((out.primal.clone(), None if out.tangent is None else out.tangent.clone()))
    (got, got_t), (want, want_t) = results
    close64(got, want)
    assert got_t is not None, "convt_ext's output has no tangent"
    close64(got_t, nonzero(want_t))
    # One tangent at a time: each argument's own contribution.
    for i in range(len(primals)):
        per = []
        for fn in (case.ours, case.ref):
            with fwAD.dual_level():
                args = list(primals)
                args[i] = fwAD.make_dual(primals[i], tangents[i])
                t = fwAD.unpack_dual(fn(*args)).tangent
                per.append(None if t is None else t.clone())
        assert per[0] is not None
        close64(per[0], per[1])


@pytest.mark.parametrize("transform", ["jacfwd", "jacrev"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_jacobians(case, transform, rng):
    """torch.func.jacfwd / jacrev with respect to every tensor argument: torch's Jacobian."""
    args = case.tensors(rng)
    jac = {"jacfwd": jacfwd, "jacrev": jacrev}[transform]
    argnums = tuple(range(len(args)))
    got = jac(case.ours, argnums=argnums)(*args)
    want = jac(case.ref, argnums=argnums)(*args)
    assert len(got) == len(want) == len(args)
    for g, w in zip(got, want):
        close64(g, nonzero(w))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_hessian(case, rng):
    """torch.func.hessian of sum(op(...)**2) with respect to every tensor argument (every
    block, mixed ones included): torch's Hessian."""
    args = case.tensors(rng)
    argnums = tuple(range(len(args)))
    got = hessian(lambda *a: (case.ours(*a) ** 2).sum(), argnums=argnums)(*args)
    want = hessian(lambda *a: (case.ref(*a) ** 2).sum(), argnums=argnums)(*args)
    for i in argnums:
        for j in argnums:
            close64(got[i][j], want[i][j])
    nonzero(want[0][0])


def test_per_sample_gradients_of_modules(rng):
    """The functorch recipe for per-sample gradients, vmap(grad(loss)) over
    functional_call of a convt_ext.nn model: torch.nn's per-sample gradients."""
    ref = _encoder_decoder((torch.nn.Conv2d, torch.nn.ConvTranspose2d), DT)
    ours = _encoder_decoder((cnn.Conv2d, cnn.ConvTranspose2d), DT)
    ours.load_state_dict(ref.state_dict())
    x, y = randn((4, 3, 6, 6), rng), randn((4, 3, 6, 6), rng)

    def per_sample(model):
        params = {k: v.detach() for k, v in model.named_parameters()}

        def loss(p, xi, yi):
            out = torch.func.functional_call(model, p, (xi.unsqueeze(0),))
            return F.mse_loss(out, yi.unsqueeze(0))

        return vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)

    got, want = per_sample(ours), per_sample(ref)
    assert got.keys() == want.keys()
    for k in want:
        close64(got[k], nonzero(want[k]))


# ------------------------------------------------------------------ 4. torch.export and TorchScript


def _export_model(D, cls):
    torch.manual_seed(0)
    conv, convt = cls[0][D], cls[1][D]
    return torch.nn.Sequential(
        conv(2, 4, 3, stride=2, padding=1, dtype=DT),
        torch.nn.ReLU(),
        convt(4, 2, 3, stride=2, padding=1, output_padding=1, dtype=DT),
    )


TORCH_CLS = ({1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d},
             {1: torch.nn.ConvTranspose1d, 2: torch.nn.ConvTranspose2d, 3: torch.nn.ConvTranspose3d})
OURS_CLS = ({1: cnn.Conv1d, 2: cnn.Conv2d, 3: cnn.Conv3d},
            {1: cnn.ConvTranspose1d, 2: cnn.ConvTranspose2d, 3: cnn.ConvTranspose3d})


@pytest.mark.parametrize("D", [1, 2, 3])
def test_torch_export(D, rng):
    """torch.export.export of a convt_ext.nn encoder-decoder: the program calls convt_ext's
    ops (no aten convolution), and .module() on a new input equals torch.nn's model."""
    ref = _export_model(D, TORCH_CLS)
    ours = _export_model(D, OURS_CLS)
    ours.load_state_dict(ref.state_dict())
    size = {1: (8,), 2: (6, 8), 3: (4, 6, 4)}[D]
    ep = torch.export.export(ours, (randn((2, 2) + size, rng),))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert sum("convt_ext" in t for t in targets) == 2, targets
    assert not any("convolution" in t or "aten.conv" in t for t in targets), targets
    x = randn((2, 2) + size, rng)
    close64(ep.module()(x), nonzero(ref(x)))
    close64(ep.module()(x), ours(x))


def _script_cases():
    C = []
    for mode in ("zeros", "reflect", "replicate", "circular"):
        C.append(pytest.param("Conv2d", (3, 4, 3), dict(stride=(2, 1), padding=(1, 2), groups=1, padding_mode=mode),
                              (2, 3, 7, 6), None, id=f"Conv2d-{mode}"))
    C.append(pytest.param("Conv2d", (4, 6, (3, 2)), dict(padding="same", dilation=2, groups=2), (2, 4, 7, 6), None,
                          id="Conv2d-same"))
    C.append(pytest.param("Conv1d", (3, 4, 3), dict(stride=2, padding=1, padding_mode="reflect"), (2, 3, 9), None,
                          id="Conv1d-reflect"))
    C.append(pytest.param("Conv1d", (4, 6, 3), dict(groups=2, dilation=2), (2, 4, 9), None, id="Conv1d"))
    C.append(pytest.param("Conv3d", (3, 4, 3), dict(stride=2, padding=1), (2, 3, 5, 4, 5), None, id="Conv3d"))
    C.append(pytest.param("Conv3d", (3, 4, 2), dict(padding=1, padding_mode="circular"), (1, 3, 4, 3, 4), None,
                          id="Conv3d-circular"))
    C.append(pytest.param("ConvTranspose1d", (3, 4, 3), dict(stride=2, padding=1, output_padding=1), (2, 3, 6), None,
                          id="ConvTranspose1d"))
    C.append(pytest.param("ConvTranspose2d", (4, 6, 3), dict(stride=2, padding=1, groups=2, dilation=(1, 2)),
                          (2, 4, 5, 4), None, id="ConvTranspose2d"))
    C.append(pytest.param("ConvTranspose2d", (3, 4, 3), dict(stride=2, padding=1), (2, 3, 5, 4), [10, 8],
                          id="ConvTranspose2d-output_size"))
    C.append(pytest.param("ConvTranspose3d", (3, 4, 3), dict(stride=2, padding=1, output_padding=1),
                          (1, 3, 3, 2, 3), None, id="ConvTranspose3d"))
    C.append(pytest.param("Unfold", ((3, 2),), dict(dilation=(1, 2), padding=1, stride=(2, 1)), (2, 3, 7, 6), None,
                          id="Unfold"))
    C.append(pytest.param("Fold", ((5, 6), (3, 2)), dict(dilation=1, padding=(1, 0), stride=(2, 1)), (2, 18, 15),
                          None, id="Fold"))
    return C


@pytest.mark.parametrize("cls, args, kwargs, in_shape, output_size", _script_cases())
def test_torchscript(cls, args, kwargs, in_shape, output_size, rng):
    """torch.jit.script of each convt_ext.nn module works, the scripted graph calls
    convt_ext's ops, and output and input gradient equal torch.nn's module with the same
    parameters (every padding_mode of Conv2d; ConvTranspose2d with output_size)."""
    torch.manual_seed(0)
    if cls in ("Unfold", "Fold"):
        ref = getattr(torch.nn, cls)(*args, **kwargs)
        ours = getattr(cnn, cls)(*args, **kwargs)
    else:
        ref = getattr(torch.nn, cls)(*args, **kwargs, dtype=DT)
        ours = getattr(cnn, cls).from_torch(ref)
    scripted = torch.jit.script(ours)
    assert "convt_ext::" in str(scripted.inlined_graph)
    x = randn(in_shape, rng).requires_grad_(True)
    if output_size is None:
        want, got = ref(x), scripted(x)
    else:
        want, got = ref(x, output_size=output_size), scripted(x, output_size)
        assert list(got.shape[2:]) == output_size
    close64(got, nonzero(want))
    up = randn(want.shape, rng)
    (gw,) = torch.autograd.grad(want, x, up)
    (gg,) = torch.autograd.grad(got, x, up)
    close64(gg, nonzero(gw))


@pytest.mark.parametrize("cls, args, in_shape", [
    ("Conv1d", (3, 4, 3), (3, 9)),
    ("Conv3d", (2, 3, 2), (2, 4, 3, 4)),
    ("ConvTranspose2d", (3, 2, 3), (3, 4, 5)),
    ("Unfold", ((2, 3),), (3, 5, 6)),
    ("Unfold", (2,), (3, 9)),
])
def test_torchscript_unbatched(cls, args, in_shape, rng):
    """A scripted module takes an unbatched input (C, *spatial) as torch.nn's does, by the
    same rule as convt_ext.functional, and gives torch's result."""
    torch.manual_seed(0)
    if cls == "Unfold":
        ref, ours = torch.nn.Unfold(*args), cnn.Unfold(*args)
        if len(in_shape) == 2:  # 1-d: torch's Unfold is 2-d only; the 1-d windows of a 1-row image
            ref = lambda x: F.unfold(x.unsqueeze(1), (1, args[0]))  # noqa: E731
    else:
        ref = getattr(torch.nn, cls)(*args, dtype=DT)
        ours = getattr(cnn, cls).from_torch(ref)
    x = randn(in_shape, rng)
    got = torch.jit.script(ours)(x)
    assert got.shape == ours(x).shape
    close64(got, nonzero(ref(x)))


def test_torchscript_unfold_refuses_sequences_of_other_lengths(rng):
    """A scripted Unfold whose tuple arguments disagree in length is refused by the op
    (naming the argument), as the eager one is, never computed with one of them cut or
    stretched."""
    ours = cnn.Unfold((2, 2), stride=(1, 1, 1))
    x = randn((1, 2, 5, 5), rng)
    with pytest.raises(ValueError, match="stride"):
        ours(x)
    with pytest.raises(RuntimeError, match="stride must have 2 values"):
        torch.jit.script(ours)(x)


def test_torchscript_save_and_load(tmp_path, rng):
    """A scripted model of convt_ext modules (2-d 'same' padding with an even kernel, a
    1-d transposed layer, a 3-d Unfold) survives torch.jit.save / torch.jit.load and still
    computes torch's result."""
    torch.manual_seed(0)
    ref2 = torch.nn.Conv2d(3, 4, (4, 3), padding="same", dtype=DT)
    ref1 = torch.nn.ConvTranspose1d(4, 2, 3, stride=2, dtype=DT)

    class Three(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = cnn.Conv2d.from_torch(ref2), cnn.ConvTranspose1d.from_torch(ref1), cnn.Unfold((2, 2, 2))

        def forward(self, x, s, v):
            return self.a(x), self.b(s), self.c(v)

    path = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(Three()), str(path))
    loaded = torch.jit.load(str(path))
    x, s, v = randn((2, 3, 7, 6), rng), randn((2, 4, 9), rng), randn((1, 2, 4, 3, 3), rng)
    a, b, c = loaded(x, s, v)
    close64(a, nonzero(ref2(x)))
    close64(b, nonzero(ref1(s)))
    close64(c, nonzero(F.conv3d(v.flatten(0, 1).unsqueeze(1), torch.eye(8, dtype=DT).view(8, 1, 2, 2, 2))
                                  .view(1, 2 * 8, -1)))


def test_bare_op_under_torch_func_raises_clearly(rng):
    """torch.ops.convt_ext.* called directly under torch.func with differentiable inputs is
    a RuntimeError that names the Python function to call (never a silent wrong gradient)."""
    x, w = randn((1, 2, 5, 5), rng), randn((3, 2, 3, 3), rng)
    with pytest.raises(RuntimeError, match=r"convt_ext\.conv2d\(\)"):
        torch.func.grad(lambda x: torch.ops.convt_ext.conv2d(x, w, None, [1, 1], [0, 0], [1, 1], 1).sum())(x)
    g = torch.func.grad(lambda x: convt_ext.conv2d(x, w).sum())(x)
    close64(g, nonzero(torch.func.grad(lambda x: F.conv2d(x, w).sum())(x)))


def test_amp_training_with_grad_scaler(rng):
    """A small encoder-decoder of convt_ext modules trains under CPU autocast (bfloat16)
    with a GradScaler exactly as the same torch.nn model does: activations in bfloat16,
    float32 parameters and gradients, and parameters that stay close to torch's over a
    few steps."""
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
                              torch.nn.ConvTranspose2d(8, 3, 4, stride=2, padding=1))
    ours = torch.nn.Sequential(cnn.Conv2d.from_torch(ref[0]), torch.nn.ReLU(), cnn.ConvTranspose2d.from_torch(ref[2]))
    x, target = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    initial = [p.detach().clone() for p in ref.parameters()]
    losses = {}
    for name, model in (("torch", ref), ("ours", ours)):
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        losses[name] = []
        for _ in range(3):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
                assert out.dtype == torch.bfloat16
                loss = F.mse_loss(out.float(), target)
            scaler.scale(loss).backward()
            assert all(p.grad.dtype == torch.float32 for p in model.parameters())
            scaler.step(opt)
            scaler.update()
            losses[name].append(loss.item())
    assert losses["ours"] == pytest.approx(losses["torch"], rel=2e-2)
    for p, q, p0 in zip(ours.parameters(), ref.parameters(), initial):
        assert p.dtype == torch.float32
        # Training moved each parameter, and ours moved as torch's did, to bfloat16 rounding.
        moved = (q - p0).abs().max()
        assert moved > 1e-3
        assert (p - q).abs().max() < 0.05 * moved


# ------------------------------------------------------------------ 5. determinism across thread counts

DET_CASES = [
    pytest.param(convt_ext.conv2d, F.conv2d, (8, 16, 32, 32), (16, 16, 3, 3), 16, dict(padding=1), id="conv2d"),
    pytest.param(convt_ext.conv2d, F.conv2d, (8, 16, 32, 32), (32, 4, 3, 3), 32, dict(stride=2, padding=1, groups=4),
                 id="conv2d-groups4-stride2"),
    pytest.param(convt_ext.conv2d, F.conv2d, (1, 16, 48, 40), (8, 16, 3, 3), 8, dict(padding=1, dilation=2),
                 id="conv2d-batch1"),
    pytest.param(convt_ext.conv2d, F.conv2d, (9, 6, 17, 23), (8, 3, 5, 3), 8, dict(stride=(1, 2), padding=2, groups=2),
                 id="conv2d-odd"),
    pytest.param(convt_ext.conv_transpose2d, F.conv_transpose2d, (8, 16, 16, 16), (16, 8, 4, 4), 16,
                 dict(stride=2, padding=1, groups=2), id="conv_transpose2d"),
    pytest.param(convt_ext.conv_transpose2d, F.conv_transpose2d, (1, 16, 24, 24), (16, 8, 3, 3), 8,
                 dict(stride=2, padding=1, output_padding=1), id="conv_transpose2d-batch1"),
    pytest.param(convt_ext.conv3d, F.conv3d, (8, 8, 8, 8, 8), (8, 4, 3, 3, 3), 8, dict(padding=1, groups=2), id="conv3d"),
    pytest.param(convt_ext.conv3d, F.conv3d, (2, 8, 12, 10, 9), (16, 8, 3, 3, 3), 16, dict(stride=2, padding=1),
                 id="conv3d-batch2"),
    # The remaining plans: a 1x1 layer (its input is its own column matrix), one sample with a
    # long reduction and a small weight (the GEMM a multi-threaded BLAS would split), the
    # transposed 1x1 path with one sample, and a 1-d wide layer.
    pytest.param(convt_ext.conv2d, F.conv2d, (4, 64, 20, 20), (96, 64, 1, 1), 96, {}, id="conv2d-1x1"),
    pytest.param(convt_ext.conv2d, F.conv2d, (1, 4, 96, 96), (4, 4, 3, 3), 4, dict(padding=1), id="conv2d-long-reduction"),
    pytest.param(convt_ext.conv_transpose2d, F.conv_transpose2d, (1, 64, 24, 24), (64, 48, 1, 1), 48, {},
                 id="conv_transpose2d-1x1-batch1"),
    pytest.param(convt_ext.conv1d, F.conv1d, (6, 32, 200), (48, 32, 5), 48, dict(padding=2, stride=3), id="conv1d-wide"),
    # Shapes whose weight gradients differed between thread counts on an Intel AVX-512 CPU when
    # MKL ran with torch's thread setting (Note [Bits that do not depend on the thread setting]).
    pytest.param(convt_ext.conv2d, F.conv2d, (3, 40, 37, 29), (40, 40, 3, 3), 40, dict(padding=1), id="conv2d-intel-3x3"),
    pytest.param(convt_ext.conv2d, F.conv2d, (7, 96, 15, 15), (96, 96, 1, 1), 96, {}, id="conv2d-intel-1x1"),
    pytest.param(convt_ext.conv2d, F.conv2d, (8, 32, 20, 20), (32, 32, 3, 3), 32, dict(padding=1), id="conv2d-intel-agree"),
]


def _gemm_counters():
    info = convt_ext.engine_info()
    return sum(info["calls"].values()), info["thread_dependent_calls"], info["pinned_calls"], info["calls"]["aten"]


@pytest.fixture
def restore_determinism():
    old = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        yield
    finally:
        torch.set_num_threads(old)
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "use_deterministic_algorithms"])
@pytest.mark.parametrize("ours, ref, xs, ws, out_ch, kw", DET_CASES)
def test_bitwise_reproducible_across_thread_counts(ours, ref, xs, ws, out_ch, kw, deterministic, rng,
                                                   restore_determinism):
    """float32 output and input, weight and bias gradients are bitwise identical with 1, 2,
    3 and 4 intra-op threads (batches larger and smaller than the thread count, groups),
    with and without torch.use_deterministic_algorithms(True); and close to torch."""
    torch.use_deterministic_algorithms(deterministic)
    x, w, b = (randn(s, rng, torch.float32) for s in (xs, ws, (out_ch,)))
    leaves = [t.requires_grad_(True) for t in (x, w, b)]
    up = None
    results = {}
    calls, dependent, pinned, aten = _gemm_counters()
    depthwise = convt_ext.engine_info()["path"]["calls"]["depthwise"]
    for threads in (1, 2, 3, 4):
        torch.set_num_threads(threads)
        assert torch.get_num_threads() == threads
        out = ours(*leaves, **kw)
        if up is None:
            up = randn(out.shape, rng, torch.float32)
        results[threads] = [out.detach()] + list(torch.autograd.grad(out, leaves, up))
    # Every GEMM ran on an engine whose bits cannot follow the thread setting, and every BLAS
    # call with MKL pinned to one thread (where this torch has MKL's thread-local control).
    calls2, dependent2, pinned2, aten2 = _gemm_counters()
    # GEMMs ran, or the depthwise path's direct sums (groups of few channels) did.
    assert calls2 > calls or convt_ext.engine_info()["path"]["calls"]["depthwise"] > depthwise
    assert dependent2 == dependent, "a GEMM ran where its bits may depend on the thread count"
    if convt_ext.engine_info()["thread_independent"]["aten"] and torch.backends.mkl.is_available():
        assert pinned2 - pinned == aten2 - aten
    for threads in (2, 3, 4):
        for name, a, e in zip(("output", "input grad", "weight grad", "bias grad"), results[threads], results[1]):
            assert torch.equal(a, e), f"{name} with {threads} threads differs from 1 thread by {(a - e).abs().max()}"
    # And the values are torch's (float64 reference).
    l64 = [t.detach().double().requires_grad_(True) for t in leaves]
    want = ref(*l64, **kw)
    want_all = [want.detach()] + list(torch.autograd.grad(want, l64, up.double()))
    for a, e in zip(results[1], want_all):
        torch.testing.assert_close(a.double(), nonzero(e), rtol=1e-4, atol=1e-3)


def _pixels(t):
    """t with the same values, in channels-last memory."""
    return t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)


@pytest.mark.parametrize("path", ["auto", "view", "columns"])
def test_route_is_the_same_at_every_thread_count(path, restore_determinism):
    """Small 1x1 layers, where torch's own choice of the output's memory format follows the
    thread count (oneDNN with several threads, its slow kernel with one): the path each op
    takes, and so every bit of the output and the gradients, do not. The 3-d weight
    gradient of a channels_last_3d input took the view path at one thread and the pixel
    rows at two, under a forced view, and differed in the last bits."""
    if path == "view" and not convt_ext.engine_info()["path"]["view_available"]:
        pytest.skip("the view path needs oneDNN's ukernel")
    old_path = convt_ext.conv_path()
    convt_ext.set_conv_path(path)
    gen = torch.Generator().manual_seed(3)
    try:
        for dims, batch, pixels_in, pixels_w in itertools.product((2, 3), (1, 2), (False, True), (False, True)):
            spatial = (3, 6, 4)[:dims] if dims == 3 else (3, 6)
            x = torch.randn(batch, 16, *spatial, generator=gen)
            w = torch.randn(16, 16, *(1,) * dims, generator=gen)
            x, w = (_pixels(t) if p else t for t, p in ((x, pixels_in), (w, pixels_w)))
            for op in ("conv", "conv_transpose"):
                f = getattr(convt_ext, f"{op}{dims}d")
                runs, dy = {}, None
                for threads in (1, 2):
                    torch.set_num_threads(threads)
                    before = convt_ext.engine_info()["path"]["calls"]
                    leaves = [x.clone().requires_grad_(), w.clone().requires_grad_()]
                    y = f(*leaves)
                    # One upstream gradient, in one layout: torch's format for y, which
                    # follows the thread count, must not reach the backward's route.
                    if dy is None:
                        dy = torch.randn(y.shape, generator=gen)
                        dy = _pixels(dy) if pixels_w else dy
                    grads = torch.autograd.grad(y, leaves, dy)
                    dw = getattr(convt_ext, f"conv{dims}d_weight")(x, w.shape, dy)
                    after = convt_ext.engine_info()["path"]["calls"]
                    runs[threads] = ([after[k] - before[k] for k in ("view", "columns")], [y.detach(), *grads, dw])
                what = (path, op, dims, batch, pixels_in, pixels_w)
                assert runs[1][0] == runs[2][0], f"{what}: calls per path {runs[1][0]} at 1 thread, {runs[2][0]} at 2"
                for a, b in zip(runs[1][1], runs[2][1]):
                    assert torch.equal(a, b), f"{what}: differs by {(a - b).abs().max()}"
                # And the values are torch's.
                l64 = [t.double().requires_grad_() for t in (x, w)]
                ref = getattr(F, f"{op}{dims}d")(*l64)
                want = [ref.detach(), *torch.autograd.grad(ref, l64, dy.double())]
                want.append(getattr(torch.nn.grad, f"conv{dims}d_weight")(l64[0].detach(), w.shape, dy.double()))
                for a, e in zip(runs[1][1], want):
                    torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-4)
    finally:
        convt_ext.set_conv_path(old_path)
