"""The N-d ops (1, 2 or 3 spatial dims): im2col / col2im, conv{1,2,3}d,
conv_transpose{1,2,3}d, conv{1,2,3}d_weight, their torch.ops.convt_ext forms,
and the modules Conv1d / Conv3d / ConvTranspose1d / ConvTranspose3d / Unfold /
Fold: float64 parity sweeps (value and every gradient), the im2col layout and
its adjoint, how D is inferred, gradcheck / gradgradcheck, opcheck,
torch.compile, argument errors and float16 / bfloat16.

Every expected value is computed independently of convt_ext, from torch in
float64: torch.nn.functional's convolutions, torch.nn.grad, F.unfold / F.fold
(2-d), and for im2col / col2im in 1-d and 3-d a one-hot convolution (a grouped
F.convNd with an identity kernel) and its adjoint through torch.autograd."""
import itertools
import math
import random
import zlib
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import convt_ext
from conftest import assert_unchanged, make_tensor, randn

ops = torch.ops.convt_ext

# torch.nn's reference modules warn about 'same' padding with even kernels.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")

TORCH_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
TORCH_CONVT = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
TORCH_CONV_WEIGHT = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}


def ours(name, D):
    """convt_ext's public function `name` for D spatial dims (looked up lazily, so that
    a build without it fails the tests that need it, not the collection)."""
    return getattr(convt_ext, name.format(D=D))


def close64(got, want, rtol=1e-10, atol=1e-12):
    """Tight float64 comparison; atol scales with the reference's magnitude."""
    assert got.shape == want.shape, (tuple(got.shape), tuple(want.shape))
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol * scale)


def close_lowp(got, want, tol):
    """A low-precision result against a float64 reference: |got - want| <= tol * max|want|
    (plus rtol). The dtype of `got` is checked by the caller."""
    assert got.shape == want.shape, (tuple(got.shape), tuple(want.shape))
    scale = max(1e-3, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * scale)


def window_count(size, k, s, p, d):
    span = size + 2 * p - d * (k - 1) - 1
    return span // s + 1 if span >= 0 else 0


def transposed_size(size, k, s, p, op, d):
    return (size - 1) * s - 2 * p + d * (k - 1) + op + 1


def _seed(text):
    return zlib.crc32(text.encode())


def _gen(text):
    return torch.Generator().manual_seed(_seed(text))


# Tests that run with torch's default number of intra-op threads, exercising the parallel
# paths (tasks over blocks of positions and over samples, each with its own workspace).
PARALLEL_TESTS = {
    "test_sweep_subset_multithreaded",
    "test_many_window_positions",
    "test_batch_chunks_with_remainders",
    "test_memory_formats_and_expanded_gradients",
}


@pytest.fixture(autouse=True)
def _one_thread(request):
    """Every other test runs with one intra-op thread: on a busy 2-core machine each
    parallel region of a tiny op costs a scheduler tick, which would dominate the runtime
    of the sweeps, opcheck and torch.compile tests. Results do not depend on it."""
    if request.node.originalname in PARALLEL_TESTS:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ------------------------------------------------------------------ independent references


def ref_im2col(x, kernel_size, dilation, padding, stride):
    """im2col in float64 as a one-hot grouped convolution: output channel c*K + j of
    F.convNd(x, eye(K) per channel, groups=C) is input channel c sampled at flat kernel
    offset j (row-major) of every window; flattening the window positions (row-major)
    gives (N, C*K, L). Unbatched (C, *S) in, (C*K, L) out."""
    D = len(kernel_size)
    x = x.detach().to(torch.float64)
    unbatched = x.dim() == D + 1
    if unbatched:
        x = x.unsqueeze(0)
    n, c = x.shape[:2]
    K = math.prod(kernel_size)
    eye = torch.eye(K, dtype=torch.float64).reshape((K, 1) + tuple(kernel_size))
    weight = eye.repeat((c, 1) + (1,) * D)
    y = TORCH_CONV[D](x, weight, None, tuple(stride), tuple(padding), tuple(dilation), c)
    y = y.reshape(n, c * K, math.prod(y.shape[2:]))
    return y[0] if unbatched else y


def ref_col2im(cols, output_size, kernel_size, dilation, padding, stride):
    """col2im in float64: the adjoint of ref_im2col, through torch.autograd."""
    D = len(kernel_size)
    cols = cols.detach().to(torch.float64)
    unbatched = cols.dim() == 2
    if unbatched:
        cols = cols.unsqueeze(0)
    K = math.prod(kernel_size)
    n, c = cols.shape[0], cols.shape[1] // K
    with torch.enable_grad():
        x0 = torch.zeros((n, c) + tuple(output_size), dtype=torch.float64, requires_grad=True)
        # (ref_im2col detaches its input, so the graph is built here.)
        eye = torch.eye(K, dtype=torch.float64).reshape((K, 1) + tuple(kernel_size))
        weight = eye.repeat((c, 1) + (1,) * D)
        u = TORCH_CONV[D](x0, weight, None, tuple(stride), tuple(padding), tuple(dilation), c)
        u = u.reshape(n, c * K, math.prod(u.shape[2:]))
        assert u.shape == cols.shape, (tuple(u.shape), tuple(cols.shape))
        (out,) = torch.autograd.grad(u, x0, cols, allow_unused=True)
    if out is None:
        out = torch.zeros_like(x0)
    return out[0] if unbatched else out


def _loop_im2col(x, k, d, p, s):
    """A direct-indexing im2col (batched, float64), only to validate ref_im2col."""
    D = len(k)
    n, c = x.shape[:2]
    size = x.shape[2:]
    out = [window_count(size[i], k[i], s[i], p[i], d[i]) for i in range(D)]
    K, L = math.prod(k), math.prod(out)
    cols = torch.zeros(n, c * K, L, dtype=torch.float64)
    for ch in range(c):
        for j, off in enumerate(_product(k)):
            for l, pos in enumerate(_product(out)):
                idx = [pos[i] * s[i] - p[i] + off[i] * d[i] for i in range(D)]
                if all(0 <= idx[i] < size[i] for i in range(D)):
                    cols[:, ch * K + j, l] = x[(slice(None), ch) + tuple(idx)]
    return cols


def _product(dims):
    return list(itertools.product(*[range(v) for v in dims]))


def test_references_are_right():
    """The references themselves: ref_im2col/ref_col2im equal F.unfold/F.fold in 2-d,
    a direct-indexing loop in 1-d and 3-d, and are each other's adjoints."""
    gen = _gen("references")
    x = randn((2, 3, 7, 6), gen)
    for k, d, p, s in [((3, 2), (1, 2), (1, 0), (2, 1)), ((1, 4), (2, 1), (2, 2), (1, 3))]:
        u = ref_im2col(x, k, d, p, s)
        close64(u, F.unfold(x, k, d, p, s), rtol=0, atol=0)
        c = randn(u.shape, gen)
        close64(ref_col2im(c, (7, 6), k, d, p, s), F.fold(c, (7, 6), k, d, p, s))
    for shape, k, d, p, s in [
        ((2, 2, 9), (3,), (2,), (1,), (2,)),
        ((1, 2, 4, 5, 3), (2, 3, 1), (1, 1, 2), (1, 0, 2), (2, 1, 1)),
        ((2, 1, 3, 3, 4), (2, 2, 2), (2, 1, 1), (1, 1, 0), (1, 2, 3)),
    ]:
        x = randn(shape, gen)
        u = ref_im2col(x, k, d, p, s)
        close64(u, _loop_im2col(x, k, d, p, s), rtol=0, atol=0)
        c = randn(u.shape, gen)
        lhs = (u * c).sum()
        rhs = (x * ref_col2im(c, shape[2:], k, d, p, s)).sum()
        assert abs(lhs - rhs).item() <= 1e-12 * max(1.0, (u.abs() * c.abs()).sum().item())
        # Unbatched forms.
        close64(ref_im2col(x[0], k, d, p, s), u[0])
        close64(ref_col2im(c[0], shape[2:], k, d, p, s), ref_col2im(c, shape[2:], k, d, p, s)[0])


# ------------------------------------------------------------------ case generation

BATCHES = (2, 1, 3, 0, 2, None, 3, 1)  # 6 of 8 batched and non-empty
LAYOUTS_ND = ("contiguous", "transposed", "sliced", "offset", "channels_last")
SIZE_MAX = {1: 12, 2: 8, 3: 7}
KERNEL_MAX = {1: 5, 2: 4, 3: 3}
COMBOS = [(s, d, op) for s in (1, 2, 3) for d in (1, 2, 3) for op in range(max(s, d))]


def _draw(r, D, lo, hi):
    return tuple(r.randint(lo, hi) for _ in range(D))


def _conv_cases(D, n, seed):
    r = random.Random(seed)
    cases = []
    while len(cases) < n:
        i = len(cases)
        g = r.choice((1, 1, 2, 3))
        cin, cout = g * r.randint(1, 2), g * r.randint(1, 2)
        k = _draw(r, D, 1, KERNEL_MAX[D])
        s = _draw(r, D, 1, 3)
        d = _draw(r, D, 1, 3)
        size = _draw(r, D, 1, SIZE_MAX[D])
        kind = ("int", "int", "same", "int", "int", "valid")[i % 6]
        if kind == "int":
            p = _draw(r, D, 0, 2)
        elif kind == "same":
            p, s = "same", (1,) * D
        else:
            p = "valid"
        pp = (0,) * D if isinstance(p, str) else p
        if p != "same" and any(window_count(size[j], k[j], s[j], pp[j], d[j]) < 1 for j in range(D)):
            continue
        cases.append(
            dict(op="conv", D=D, batch=BATCHES[i % len(BATCHES)], groups=g, cin=cin, cout=cout, size=size, k=k,
                 s=s, p=p, d=d, bias=r.random() < 0.6, layout=LAYOUTS_ND[r.randrange(len(LAYOUTS_ND))],
                 scalar=r.random() < 0.3)
        )
    return cases


def _valid_transposed(size, k, s, p, op, d):
    return all(op[j] < max(s[j], d[j]) and transposed_size(size[j], k[j], s[j], p[j], op[j], d[j]) >= 1
               for j in range(len(size)))


def _convt_case(r, D, i, k, s, p, op, d, size, batch=None):
    g = r.choice((1, 1, 2, 3))
    return dict(op="convt", D=D, batch=BATCHES[i % len(BATCHES)] if batch is None else batch, groups=g,
                cin=g * r.randint(1, 2), cout=g * r.randint(1, 2), size=size, k=k, s=s, p=p, opad=op, d=d,
                bias=r.random() < 0.6, layout=LAYOUTS_ND[r.randrange(len(LAYOUTS_ND))], scalar=r.random() < 0.3)


def _convt_cases(D, n, seed):
    r = random.Random(seed)
    cases = []
    while len(cases) < n:
        k = _draw(r, D, 1, KERNEL_MAX[D])
        s = _draw(r, D, 1, 3)
        d = _draw(r, D, 1, 3)
        p = _draw(r, D, 0, 2)
        op = tuple(r.randrange(max(s[j], d[j])) for j in range(D))
        size = _draw(r, D, 1, {1: 9, 2: 6, 3: 4}[D])
        if not _valid_transposed(size, k, s, p, op, d):
            continue
        cases.append(_convt_case(r, D, len(cases), k, s, p, op, d, size))
    return cases


def _convt_every_output_padding(D, seed):
    """Every (stride, dilation, output_padding) with stride, dilation in 1..3 and
    0 <= output_padding < max(stride, dilation), in every dimension (the dimensions'
    lists shuffled independently), all with a non-empty batch."""
    r = random.Random(seed)
    columns = [COMBOS[:] for _ in range(D)]
    for col in columns[1:]:
        r.shuffle(col)
    cases = []
    for row in zip(*columns):
        s = tuple(c[0] for c in row)
        d = tuple(c[1] for c in row)
        op = tuple(c[2] for c in row)
        while True:
            k = _draw(r, D, 1, KERNEL_MAX[D])
            p = _draw(r, D, 0, 2)
            size = _draw(r, D, 1, {1: 6, 2: 4, 3: 3}[D])
            if _valid_transposed(size, k, s, p, op, d):
                break
        cases.append(_convt_case(r, D, len(cases), k, s, p, op, d, size, batch=r.choice((1, 2, 3))))
    return cases


def _weight_cases(D, n, seed):
    r = random.Random(seed)
    cases = []
    while len(cases) < n:
        g = r.choice((1, 2, 3))
        k = _draw(r, D, 1, KERNEL_MAX[D])
        s = _draw(r, D, 1, 3)
        d = _draw(r, D, 1, 3)
        p = _draw(r, D, 0, 2)
        size = _draw(r, D, 1, SIZE_MAX[D])
        out = tuple(window_count(size[j], k[j], s[j], p[j], d[j]) for j in range(D))
        if min(out) < 1:
            continue
        cases.append(dict(op="weight", D=D, batch=r.choice((1, 2, 3, 1, 2, 0)), groups=g, cin=g * r.randint(1, 2),
                          cout=g * r.randint(1, 2), size=size, k=k, s=s, p=p, d=d, out=out))
    return cases


CONV_CASES = _conv_cases(1, 60, 101) + _conv_cases(3, 60, 103) + _conv_cases(2, 12, 102)
CONVT_CASES = (
    _convt_cases(1, 40, 201) + _convt_every_output_padding(1, 211)
    + _convt_cases(3, 40, 203) + _convt_every_output_padding(3, 213)
    + _convt_cases(2, 12, 202)
)
WEIGHT_CASES = _weight_cases(1, 20, 301) + _weight_cases(3, 20, 303) + _weight_cases(2, 6, 302)


def _t(v):
    return "x".join(map(str, v)) if isinstance(v, tuple) else str(v)


def _id(case):
    b = "u" if case["batch"] is None else f"n{case['batch']}"
    op = f"-op{_t(case['opad'])}" if "opad" in case else ""
    extra = f"-{'b' if case.get('bias') else 'nb'}-{case.get('layout', '')}" if "layout" in case else ""
    return (f"{case['op']}{case['D']}d-{b}-g{case['groups']}-c{case['cin']}to{case['cout']}-{_t(case['size'])}"
            f"-k{_t(case['k'])}-s{_t(case['s'])}-p{_t(case['p'])}-d{_t(case['d'])}{op}{extra}")


def _arg(v, scalar):
    """A per-dim tuple, or its single int when `scalar` and every entry is equal."""
    if scalar and not isinstance(v, str) and len(set(v)) == 1:
        return v[0]
    return v


def test_sweeps_cover_every_op_dimension_and_feature():
    """The sweeps compute something: every op in every D, mostly non-empty batches,
    groups > 1, dilation > 1, stride > 1, 'same'/'valid', unbatched and empty batches,
    and every valid output_padding (>= stride too) in every dimension for D = 1 and 3."""
    all_cases = CONV_CASES + CONVT_CASES + WEIGHT_CASES
    counts = Counter((c["op"], c["D"]) for c in all_cases)
    for op in ("conv", "convt", "weight"):
        for D in (1, 2, 3):
            assert counts[(op, D)] >= (5 if D == 2 else 20), (op, D, counts[(op, D)])
            cases = [c for c in all_cases if c["op"] == op and c["D"] == D]
            nonempty = [c for c in cases if c["batch"] not in (0, None)]
            assert len(nonempty) >= 0.6 * len(cases), (op, D)
            assert any(c["groups"] > 1 for c in nonempty), (op, D)
            assert any(c["cin"] != c["cout"] for c in nonempty), (op, D)
            if D != 2:
                assert any(max(c["d"]) > 1 for c in nonempty), (op, D)
                assert any(max(c["s"]) > 1 for c in nonempty), (op, D)
                assert any(max(c["k"]) > 1 for c in nonempty), (op, D)
                assert any(not isinstance(c["p"], str) and max(c["p"]) > 0 for c in nonempty), (op, D)
                # Per-dimension values really differ within a case.
                if D == 3:
                    assert any(len(set(c["k"])) > 1 or len(set(c["s"])) > 1 or len(set(c["d"])) > 1 for c in cases)
                # Every dimension sees stride, dilation and kernel > 1.
                for j in range(D):
                    assert any(c["s"][j] > 1 for c in nonempty) and any(c["d"][j] > 1 for c in nonempty)
                    assert any(c["k"][j] > 1 for c in nonempty)
    for op in ("conv", "convt"):
        for D in (1, 3):
            cases = [c for c in all_cases if c["op"] == op and c["D"] == D]
            batches = {c["batch"] for c in cases}
            assert {None, 0, 1, 2, 3} <= batches, (op, D, batches)
            assert {True, False} == {c["bias"] for c in cases}
            assert set(LAYOUTS_ND) == {c["layout"] for c in cases}
            assert any(c["scalar"] for c in cases)
    for D in (1, 3):
        conv = [c for c in CONV_CASES if c["D"] == D and c["batch"] not in (0, None)]
        assert any(c["p"] == "same" for c in conv) and any(c["p"] == "valid" for c in conv)
        assert any(c["p"] == "same" and any(k % 2 == 0 for k in c["k"]) for c in conv)
        assert any(c["p"] == "same" and max(c["d"]) > 1 for c in conv)
        convt = [c for c in CONVT_CASES if c["D"] == D and c["batch"] not in (0, None)]
        for j in range(D):
            assert {(c["s"][j], c["d"][j], c["opad"][j]) for c in convt} == set(COMBOS), (D, j)
        assert any(c["opad"][j] >= c["s"][j] for c in convt for j in range(D))


# ------------------------------------------------------------------ float64 parity sweeps


def _check_against(ours_fn, ref_fn, tensors, gen, expect_nonempty):
    """Outputs equal, the gradients of <out, g> wrt every tensor equal, inputs untouched."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in tensors]
    before = [t.detach().clone() if t is not None else None for t in leaves]
    ref = ref_fn(*leaves)
    got = ours_fn(*leaves)
    if expect_nonempty:
        assert ref.numel() > 0
    close64(got, ref)
    g = randn(ref.shape, gen)
    diff = [t for t in leaves if t is not None]
    # allow_unused: with an empty batch a gradient may be absent (None), i.e. zero.
    got_grads = torch.autograd.grad(got, diff, g, allow_unused=True)
    want_grads = torch.autograd.grad(ref, diff, g, allow_unused=True)
    for t, a, b in zip(diff, got_grads, want_grads):
        a = torch.zeros_like(t) if a is None else a
        b = torch.zeros_like(t) if b is None else b
        close64(a, b)
    for t, t0 in zip(leaves, before):
        if t is not None:
            assert_unchanged(t0, t.detach())
    return got


def _make_tensors(case, transposed, gen):
    D, g, cin, cout = case["D"], case["groups"], case["cin"], case["cout"]
    shape = (cin,) + case["size"] if case["batch"] is None else (case["batch"], cin) + case["size"]
    x = make_tensor(shape, gen, case["layout"])
    wshape = (cin, cout // g) + case["k"] if transposed else (cout, cin // g) + case["k"]
    w = make_tensor(wshape, gen, "transposed" if case["layout"] == "transposed" else "contiguous")
    b = randn((cout,), gen) if case["bias"] else None
    return x, w, b


@pytest.mark.parametrize("case", CONV_CASES, ids=_id)
def test_conv_nd_matches_torch_float64(case):
    gen = _gen(_id(case))
    D, sc = case["D"], case["scalar"]
    x, w, b = _make_tensors(case, False, gen)
    kw = dict(stride=_arg(case["s"], sc), padding=_arg(case["p"], sc), dilation=_arg(case["d"], sc),
              groups=case["groups"])
    fn = ours("conv{D}d", D)
    y = _check_against(lambda x, w, b: fn(x, w, b, **kw), lambda x, w, b: TORCH_CONV[D](x, w, b, **kw),
                       (x, w, b), gen, case["batch"] != 0)
    # The dispatcher op (batched, int lists).
    if case["batch"] is not None and not isinstance(case["p"], str):
        op = getattr(ops, f"conv{D}d")
        close64(op(x, w, b, list(case["s"]), list(case["p"]), list(case["d"]), case["groups"]), y.detach())


@pytest.mark.parametrize("case", CONVT_CASES, ids=_id)
def test_conv_transpose_nd_matches_torch_float64(case):
    gen = _gen(_id(case))
    D, sc = case["D"], case["scalar"]
    x, w, b = _make_tensors(case, True, gen)
    kw = dict(stride=_arg(case["s"], sc), padding=_arg(case["p"], sc), output_padding=_arg(case["opad"], sc),
              groups=case["groups"], dilation=_arg(case["d"], sc))
    fn = ours("conv_transpose{D}d", D)
    y = _check_against(lambda x, w, b: fn(x, w, b, **kw), lambda x, w, b: TORCH_CONVT[D](x, w, b, **kw),
                       (x, w, b), gen, case["batch"] != 0)
    # Positional order: groups before dilation.
    close64(fn(x, w, b, kw["stride"], kw["padding"], kw["output_padding"], kw["groups"], kw["dilation"]), y.detach())
    if case["batch"] is not None:
        op = getattr(ops, f"conv_transpose{D}d")
        got = op(x, w, b, list(case["s"]), list(case["p"]), list(case["opad"]), case["groups"], list(case["d"]))
        close64(got, y.detach())


@pytest.mark.parametrize("case", WEIGHT_CASES, ids=_id)
def test_conv_nd_weight_matches_torch_float64(case):
    gen = _gen(_id(case))
    D, g = case["D"], case["groups"]
    x = randn((case["batch"], case["cin"]) + case["size"], gen)
    dy = randn((case["batch"], case["cout"]) + case["out"], gen)
    wsize = (case["cout"], case["cin"] // g) + case["k"]
    args = (case["s"], case["p"], case["d"], g)
    fn = ours("conv{D}d_weight", D)
    got = _check_against(lambda x, dy: fn(x, wsize, dy, *args), lambda x, dy: TORCH_CONV_WEIGHT[D](x, wsize, dy, *args),
                         (x, dy), gen, True)  # weight-shaped: never empty
    assert tuple(got.shape) == wsize
    op = getattr(ops, f"conv{D}d_weight")
    close64(op(x, dy, list(wsize), list(case["s"]), list(case["p"]), list(case["d"]), g), got.detach())


@pytest.mark.parametrize("D", [1, 3])
@pytest.mark.parametrize("transposed", [False, True])
def test_double_backward_matches_torch(D, transposed):
    """A gradient penalty (a function of the input and weight gradients) has torch's gradients."""
    gen = _gen(f"double-{D}-{transposed}")
    if transposed:
        x, w, b = randn((2, 4) + (3,) * D, gen), randn((4, 3) + (2,) * D, gen), randn((6,), gen)
        kw = dict(stride=2, padding=1, output_padding=(1,) + (2,) * (D - 1), groups=2, dilation=(1,) + (3,) * (D - 1))
        fns = (ours("conv_transpose{D}d", D), TORCH_CONVT[D])
    else:
        x, w, b = randn((2, 4) + (5,) * D, gen), randn((6, 2) + (3,) * D, gen), randn((6,), gen)
        kw = dict(stride=(2,) + (1,) * (D - 1), padding=1, dilation=(1,) + (2,) * (D - 1), groups=2)
        fns = (ours("conv{D}d", D), TORCH_CONV[D])

    def penalty_grads(fn):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        y = fn(*leaves, **kw)
        gx, gw = torch.autograd.grad(y.tanh().sum(), leaves[:2], create_graph=True)
        return torch.autograd.grad((gx**2).sum() + (gw**3).sum(), leaves)

    for a, r in zip(penalty_grads(fns[0]), penalty_grads(fns[1])):
        close64(a, r)


def _sweep_subset(step):
    for case in [c for c in CONV_CASES if c["D"] != 2][::step]:
        test_conv_nd_matches_torch_float64(case)
    for case in [c for c in CONVT_CASES if c["D"] != 2][::step]:
        test_conv_transpose_nd_matches_torch_float64(case)
    for case in [c for c in WEIGHT_CASES if c["D"] != 2][::step]:
        test_conv_nd_weight_matches_torch_float64(case)


@pytest.mark.parametrize("limit", [1, 512])
def test_sweep_subset_with_small_workspace(limit, restore_workspace_limit):
    """Every 4th 1-d/3-d sweep case again with a tiny workspace limit, which splits each
    sample into blocks of window (or, transposed, output) positions: the same results."""
    convt_ext.set_workspace_limit(limit)
    _sweep_subset(4)


@pytest.mark.parametrize("limit", [None, 700])
def test_sweep_subset_multithreaded(limit, restore_workspace_limit):
    """Every 10th 1-d/3-d sweep case with the default thread count (tasks in parallel),
    whole samples and small blocks."""
    if limit is not None:
        convt_ext.set_workspace_limit(limit)
    _sweep_subset(10)


@pytest.mark.parametrize("limit", [None, 3000])
@pytest.mark.parametrize("D", [1, 3])
def test_many_window_positions(D, limit, restore_workspace_limit):
    """More than a thousand window positions per sample (per-sample blocks instead of one
    wide GEMM over the batch), batched and single, whole or split by the workspace limit."""
    if limit is not None:
        convt_ext.set_workspace_limit(limit)
    gen = _gen(f"many-{D}-{limit}")
    size = (1500,) if D == 1 else (11, 12, 13)
    k, s, p, d = ((3,), (1,), (2,), (2,)) if D == 1 else ((2, 3, 2), (1, 1, 2), (1, 0, 1), (2, 1, 1))
    for batch in (2, 1):
        x = randn((batch, 2) + size, gen)
        w, b = randn((3, 2) + k, gen), randn((3,), gen)
        kw = dict(stride=s, padding=p, dilation=d, groups=1)
        _check_against(lambda x, w, b: ours("conv{D}d", D)(x, w, b, **kw), lambda x, w, b: TORCH_CONV[D](x, w, b, **kw),
                       (x, w, b), gen, True)
        kwt = dict(stride=s, padding=p, output_padding=(1,) if D == 1 else (1, 0, 1), groups=2, dilation=d)
        wt = randn((2, 2) + k, gen)
        _check_against(lambda x, w, b: ours("conv_transpose{D}d", D)(x, w, b, **kwt),
                       lambda x, w, b: TORCH_CONVT[D](x, w, b, **kwt), (x, wt, randn((4,), gen)), gen, True)


@pytest.mark.parametrize("limit", [3000, 4500, 8000, 12000, 20000])
@pytest.mark.parametrize("D", [1, 3])
def test_batch_chunks_with_remainders(D, limit, restore_workspace_limit):
    """A batch of 5 processed in chunks of a few samples (the last one shorter), as the
    workspace limit allows: the same results."""
    convt_ext.set_workspace_limit(limit)
    gen = _gen(f"chunks-{D}-{limit}")
    size, k = ((20,), (3,)) if D == 1 else ((4, 3, 5), (2, 2, 2))
    x = randn((5, 2) + size, gen)
    kw = dict(stride=1, padding=(1,) * D, dilation=1, groups=1)
    _check_against(lambda x, w, b: ours("conv{D}d", D)(x, w, b, **kw), lambda x, w, b: TORCH_CONV[D](x, w, b, **kw),
                   (x, randn((3, 2) + k, gen), randn((3,), gen)), gen, True)
    kwt = dict(stride=2, padding=(1,) * D, output_padding=1, groups=2, dilation=1)
    _check_against(lambda x, w, b: ours("conv_transpose{D}d", D)(x, w, b, **kwt),
                   lambda x, w, b: TORCH_CONVT[D](x, w, b, **kwt), (x, randn((2, 2) + k, gen), randn((4,), gen)),
                   gen, True)


@pytest.mark.parametrize("D", [1, 3])
def test_memory_formats_and_expanded_gradients(D):
    """channels_last_3d / permuted / expanded inputs and weights, and an expanded upstream
    gradient (from .sum()), for the convolutions in 1-d and 3-d."""
    gen = _gen(f"formats-{D}")
    size = (9,) if D == 1 else (4, 5, 3)
    k = (3,) if D == 1 else (2, 3, 2)
    if D == 3:
        x = randn((2, 4) + size, gen).contiguous(memory_format=torch.channels_last_3d)
        w = randn((6, 2) + k, gen).contiguous(memory_format=torch.channels_last_3d)
        wt = randn((4, 3) + k, gen).contiguous(memory_format=torch.channels_last_3d)
    else:
        x = randn((2,) + size + (4,), gen).permute(0, 2, 1)
        w = randn((6,) + k + (2,), gen).permute(0, 2, 1)
        wt = randn((4,) + k + (3,), gen).permute(0, 2, 1)
    xe = randn((1, 4) + size, gen).expand((3, 4) + size)
    b = randn((6,), gen)
    for inp in (x, xe):
        for fn, ref, weight, bias, kw in (
            (ours("conv{D}d", D), TORCH_CONV[D], w, b, dict(stride=2, padding=1, dilation=1, groups=2)),
            (ours("conv_transpose{D}d", D), TORCH_CONVT[D], wt, b,
             dict(stride=2, padding=1, output_padding=1, groups=2)),
        ):
            leaves = [t.detach().requires_grad_() for t in (inp, weight, bias)]
            got = fn(*leaves, **kw)
            want = ref(*leaves, **kw)
            close64(got, want)
            ga = torch.autograd.grad(got.sum(), leaves)
            gb = torch.autograd.grad(want.sum(), leaves)
            for a, r in zip(ga, gb):
                close64(a, r)


@pytest.mark.parametrize("D", [1, 3])
def test_pointwise_kernels(D):
    """1x..x1 kernels with stride 1 and no padding (im2col is the identity), with groups,
    dilation, every batch form and non-contiguous inputs; and with stride > 1."""
    gen = _gen(f"pointwise-{D}")
    size = (7,) if D == 1 else (3, 4, 5)
    one = (1,) * D
    for batch in (2, 1, 0, None):
        for layout in ("contiguous", "transposed", "channels_last", "sliced"):
            shape = (4,) + size if batch is None else (batch, 4) + size
            x = make_tensor(shape, gen, layout)
            for stride in (1, 2):
                kw = dict(stride=stride, padding=0, dilation=2, groups=2)
                _check_against(lambda x, w, b: ours("conv{D}d", D)(x, w, b, **kw),
                               lambda x, w, b: TORCH_CONV[D](x, w, b, **kw),
                               (x, randn((6, 2) + one, gen), randn((6,), gen)), gen, batch != 0)
                kwt = dict(stride=stride, padding=0, output_padding=stride - 1, groups=2, dilation=1)
                _check_against(lambda x, w, b: ours("conv_transpose{D}d", D)(x, w, b, **kwt),
                               lambda x, w, b: TORCH_CONVT[D](x, w, b, **kwt),
                               (x, randn((4, 3) + one, gen), None), gen, batch != 0)


@pytest.mark.parametrize("D", [1, 3])
def test_conv_weight_short_grad_output(D):
    """conv{D}d_weight with a grad_output covering only the first windows (as a transposed
    convolution with output_padding >= stride produces) equals torch's weight gradient with
    grad_output zero-padded to every window, in value and in its gradients."""
    gen = _gen(f"short-{D}")
    if D == 1:
        xs, wsize, s, p, d, g, short = (2, 2, 9), (2, 2, 2), (1,), (0,), (3,), 1, (4,)
    else:
        xs, wsize, s, p, d, g, short = (1, 4, 9, 6, 5), (4, 2, 2, 3, 1), (1, 2, 1), (1, 0, 0), (3, 1, 2), 2, (6, 1, 4)
    natural = [window_count(xs[2 + j], wsize[2 + j], s[j], p[j], d[j]) for j in range(D)]
    assert all(short[j] <= natural[j] for j in range(D)) and list(short) != natural
    pad = [v for j in reversed(range(D)) for v in (0, natural[j] - short[j])]
    x, dy = randn(xs, gen), randn((xs[0], wsize[0]) + short, gen)
    _check_against(lambda x, dy: ours("conv{D}d_weight", D)(x, wsize, dy, s, p, d, g),
                   lambda x, dy: TORCH_CONV_WEIGHT[D](x, wsize, F.pad(dy, pad), s, p, d, g), (x, dy), gen, True)


# ------------------------------------------------------------------ im2col / col2im


def _im2col_cases(D, n, seed):
    r = random.Random(seed)
    batches = (2, 1, 3, None, 0, 2, 1, 3)
    cases = []
    while len(cases) < n:
        i = len(cases)
        form = ("tuples", "mixed", "tuples", "int_kernel")[i % 4]
        k = _draw(r, D, 1, KERNEL_MAX[D] + (1 if D == 1 else 0))
        s = _draw(r, D, 1, 3)
        p = _draw(r, D, 0, 2)
        d = _draw(r, D, 1, 3)
        if form == "int_kernel" or (form == "mixed" and D == 2):
            k = (k[0],) * D  # an int kernel_size (for D = 2 'mixed': every argument an int)
        if form == "mixed":  # D from kernel_size alone: the others uniform, passed as ints
            s, p, d = (s[0],) * D, (p[0],) * D, (d[0],) * D
        size = _draw(r, D, 1, SIZE_MAX[D])
        if any(window_count(size[j], k[j], s[j], p[j], d[j]) < 1 for j in range(D)):
            continue
        cases.append(dict(D=D, batch=batches[i % len(batches)], channels=r.randint(1, 3), size=size, k=k, s=s, p=p,
                          d=d, layout=LAYOUTS_ND[i % len(LAYOUTS_ND)], form=form))
    return cases


IM2COL_CASES = _im2col_cases(1, 32, 401) + _im2col_cases(3, 32, 403) + _im2col_cases(2, 12, 402)


def _im2col_id(c):
    b = "u" if c["batch"] is None else f"n{c['batch']}"
    return (f"{c['D']}d-{b}-c{c['channels']}-{_t(c['size'])}-k{_t(c['k'])}-s{_t(c['s'])}-p{_t(c['p'])}"
            f"-d{_t(c['d'])}-{c['layout']}-{c['form']}")


def _im2col_kwargs(c):
    """kernel_size/dilation/padding/stride in the case's form. 'mixed': kernel_size a tuple,
    the others ints where uniform (for D = 2: all ints where uniform, F.unfold's convention);
    'int_kernel': kernel_size an int where uniform and dilation/stride tuples (so D still
    comes from a sequence)."""
    k, d, p, s = c["k"], c["d"], c["p"], c["s"]
    if c["form"] == "mixed":
        return dict(kernel_size=_arg(k, c["D"] == 2), dilation=_arg(d, True), padding=_arg(p, True),
                    stride=_arg(s, True))
    if c["form"] == "int_kernel" and len(set(k)) == 1:
        return dict(kernel_size=k[0], dilation=d, padding=_arg(p, True), stride=s)
    return dict(kernel_size=k, dilation=d, padding=p, stride=s)


def test_im2col_sweep_covers_its_axes():
    for D in (1, 2, 3):
        cases = [c for c in IM2COL_CASES if c["D"] == D]
        assert {c["batch"] for c in cases} == {0, 1, 2, 3, None}
        assert sum(c["batch"] not in (0, None) for c in cases) >= 0.6 * len(cases)
        assert {c["layout"] for c in cases} == set(LAYOUTS_ND)
        for j in range(D):
            for key in ("k", "s", "d", "p"):
                assert len({c[key][j] for c in cases}) >= 3, (D, key, j)
        if D != 2:
            assert any(c["form"] == "int_kernel" and len(set(c["k"])) == 1 for c in cases)
            assert any(c["form"] == "mixed" and all(isinstance(v, int) for n, v in _im2col_kwargs(c).items()
                                                    if n != "kernel_size") for c in cases)
        else:
            assert any(all(isinstance(v, int) for v in _im2col_kwargs(c).values()) for c in cases)


@pytest.mark.parametrize("case", IM2COL_CASES, ids=_im2col_id)
def test_im2col_col2im_match_reference_float64(case):
    gen = _gen(_im2col_id(case))
    D, size, k, d, p, s = case["D"], case["size"], case["k"], case["d"], case["p"], case["s"]
    shape = (case["channels"],) + size if case["batch"] is None else (case["batch"], case["channels"]) + size
    kw = _im2col_kwargs(case)
    x = make_tensor(shape, gen, case["layout"]).requires_grad_()
    x_before = x.detach().clone()

    # im2col: layout (rows c*K + flat kernel offset, columns flat window position) and gradient.
    if D == 2:
        ref = F.unfold(x.detach(), k, d, p, s)
    else:
        ref = ref_im2col(x, k, d, p, s)
    if case["batch"] != 0:
        assert ref.numel() > 0
    got = convt_ext.im2col(x, **kw)
    close64(got, ref, rtol=0, atol=0)  # a pure copy
    g = randn(ref.shape, gen)
    (gx,) = torch.autograd.grad(got, x, g)
    close64(gx, F.fold(g, size, k, d, p, s) if D == 2 else ref_col2im(g, size, k, d, p, s))
    assert_unchanged(x_before, x.detach())

    # col2im on columns of that shape (non-contiguous too) and its gradient (an im2col).
    col_layout = case["layout"] if case["layout"] in ("contiguous", "transposed", "offset") else "sliced"
    c = make_tensor(ref.shape, gen, col_layout).requires_grad_()
    c_before = c.detach().clone()
    out = convt_ext.col2im(c, size, **kw)
    want = F.fold(c.detach(), size, k, d, p, s) if D == 2 else ref_col2im(c, size, k, d, p, s)
    assert tuple(out.shape) == shape
    close64(out, want)
    gy = randn(shape, gen)
    (gc,) = torch.autograd.grad(out, c, gy)
    close64(gc, F.unfold(gy, k, d, p, s) if D == 2 else ref_im2col(gy, k, d, p, s), rtol=0, atol=0)
    assert_unchanged(c_before, c.detach())

    # The adjoint identity <im2col(x), c> == <x, col2im(c)>.
    with torch.no_grad():
        u = convt_ext.im2col(x, **kw)
        v = convt_ext.col2im(c, size, **kw)
        lhs, rhs = (u * c).sum().item(), (x * v).sum().item()
        assert abs(lhs - rhs) <= 1e-12 * max(1.0, (u.abs() * c.abs()).sum().item())

    # The dispatcher ops, with D from the list lengths.
    close64(ops.im2col(x.detach(), list(k), list(d), list(p), list(s)), ref, rtol=0, atol=0)
    close64(ops.col2im(c.detach(), list(size), list(k), list(d), list(p), list(s)), want)


def test_im2col_view_matches_im2col_across_the_sweep():
    """im2col(x, k, d, p, s) == im2col_view(x padded by p, k, d, s).reshape(N, C*prod(k), L)
    over the whole im2col sweep, in 1, 2 and 3 dimensions (every batch, layout and
    argument form); with p = 0 the view is of x itself, sharing its memory."""
    counts = Counter()
    for case in IM2COL_CASES:
        gen = _gen("view-" + _im2col_id(case))
        D, size, p = case["D"], case["size"], case["p"]
        shape = (case["channels"],) + size if case["batch"] is None else (case["batch"], case["channels"]) + size
        kw = _im2col_kwargs(case)
        x = make_tensor(shape, gen, case["layout"])
        padded = F.pad(x, [q for j in reversed(range(D)) for q in (p[j], p[j])]) if any(p) else x
        view = convt_ext.im2col_view(padded, kw["kernel_size"], kw["dilation"], kw["stride"])
        want = convt_ext.im2col(x, **kw)
        assert view.shape == shape[:-D] + tuple(case["k"]) + tuple(view.shape[-D:])
        assert torch.equal(view.reshape(want.shape), want)
        if not any(p):
            assert view.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
            counts[D, "unpadded"] += 1
        counts[D, "computed"] += case["batch"] != 0 and want.numel() > 0
    for D in (1, 2, 3):
        assert counts[D, "computed"] >= {1: 24, 2: 8, 3: 24}[D], counts
        assert counts[D, "unpadded"] >= 1, counts


def test_im2col_dimension_inference():
    """D comes from any sequence argument; with ints only, 2-d/3-d input is 1-d/2-d
    (unbatched 2-d for 3-d input, as F.unfold), 4-d input is 2-d and 5-d input is 3-d."""
    gen = _gen("inference")
    x3 = randn((2, 3, 8), gen)
    # kernel_size=(3,): batched 1-d.
    got = convt_ext.im2col(x3, (3,))
    assert tuple(got.shape) == (2, 9, 6)
    close64(got, ref_im2col(x3, (3,), (1,), (0,), (1,)))
    # kernel_size=3 and every other argument an int: unbatched 2-d, as F.unfold.
    got = convt_ext.im2col(x3, 3)
    assert tuple(got.shape) == (18, 6)
    close64(got, F.unfold(x3, 3))
    # An int kernel_size with a 1-sequence stride / padding / dilation: batched 1-d.
    close64(convt_ext.im2col(x3, 3, stride=(2,)), ref_im2col(x3, (3,), (1,), (0,), (2,)))
    close64(convt_ext.im2col(x3, 2, padding=[1]), ref_im2col(x3, (2,), (1,), (1,), (1,)))
    close64(convt_ext.im2col(x3, 2, dilation=(3,), stride=2), ref_im2col(x3, (2,), (3,), (0,), (2,)))

    # 2-d input with ints: unbatched 1-d.
    x2 = randn((3, 10), gen)
    got = convt_ext.im2col(x2, 4, stride=2, padding=1)
    assert tuple(got.shape) == (12, 5)
    close64(got, ref_im2col(x2, (4,), (1,), (1,), (2,)))
    close64(convt_ext.im2col(x2, (4,)), ref_im2col(x2, (4,), (1,), (0,), (1,)))

    # 4-d input: ints -> batched 2-d; 3-sequences -> unbatched 3-d.
    x4 = randn((2, 3, 5, 6), gen)
    close64(convt_ext.im2col(x4, 2, stride=2), F.unfold(x4, 2, stride=2))
    close64(convt_ext.im2col(x4, (2, 3)), F.unfold(x4, (2, 3)))
    got = convt_ext.im2col(x4, (2, 2, 2))
    assert tuple(got.shape) == (16, 2 * 4 * 5)
    close64(got, ref_im2col(x4, (2, 2, 2), (1, 1, 1), (0, 0, 0), (1, 1, 1)))
    close64(convt_ext.im2col(x4, 2, dilation=(1, 1, 1)), got)

    # 5-d input with ints: batched 3-d.
    x5 = randn((2, 2, 3, 4, 5), gen)
    got = convt_ext.im2col(x5, 2, padding=1, stride=2)
    assert tuple(got.shape) == (2, 16, 2 * 3 * 3)
    close64(got, ref_im2col(x5, (2, 2, 2), (1, 1, 1), (1, 1, 1), (2, 2, 2)))

    # col2im: D = len(output_size) when a sequence; all ints -> 2-d (F.fold).
    c = randn((2, 9, 6), gen)
    got = convt_ext.col2im(c, (8,), 3)
    assert tuple(got.shape) == (2, 3, 8)
    close64(got, ref_col2im(c, (8,), (3,), (1,), (0,), (1,)))
    got = convt_ext.col2im(c[1], (8,), 3)
    assert tuple(got.shape) == (3, 8)
    close64(got, ref_col2im(c[1], (8,), (3,), (1,), (0,), (1,)))
    close64(convt_ext.col2im(c, [8], (3,), 1, 0, 1), ref_col2im(c, (8,), (3,), (1,), (0,), (1,)))
    c2 = randn((2, 9, 12), gen)
    close64(convt_ext.col2im(c2, (5, 6), 3), F.fold(c2, (5, 6), 3))
    c2b = randn((2, 9, 16), gen)
    close64(convt_ext.col2im(c2b, 6, 3), F.fold(c2b, 6, 3))
    close64(convt_ext.col2im(c2b[0], 6, 3), F.fold(c2b[0], 6, 3))
    c3 = randn((2, 2 * 8, 3 * 4 * 5), gen)
    got = convt_ext.col2im(c3, (4, 5, 6), 2)
    assert tuple(got.shape) == (2, 2, 4, 5, 6)
    close64(got, ref_col2im(c3, (4, 5, 6), (2, 2, 2), (1, 1, 1), (0, 0, 0), (1, 1, 1)))
    close64(convt_ext.col2im(c3[0], (4, 5, 6), 2),
            ref_col2im(c3[0], (4, 5, 6), (2, 2, 2), (1, 1, 1), (0, 0, 0), (1, 1, 1)))


@pytest.mark.parametrize("D", [1, 3])
def test_im2col_col2im_non_contiguous_views(D):
    """Permuted / sliced / expanded views of input and columns."""
    gen = _gen(f"views-{D}")
    k, d, p, s = ((3,), (2,), (1,), (2,)) if D == 1 else ((2, 1, 3), (1, 2, 1), (1, 0, 1), (2, 1, 1))
    size = (11,) if D == 1 else (4, 5, 4)
    big = randn((3, 5) + tuple(2 * v + 1 for v in size), gen)
    views = [
        big[::2, 1::2][(Ellipsis,) + tuple(slice(1, None, 2) for _ in size)],  # strided slices
        randn((2, 3) + size, gen).transpose(0, 1),  # batch/channel swapped in memory
        randn(size + (3, 2), gen).permute((D + 1, D) + tuple(range(D))),  # channels-last style
        randn((1, 2) + size, gen).expand((3, 2) + size),  # stride-0 batch
        randn(size + (2,), gen).permute((D,) + tuple(range(D))),  # unbatched, channels last
    ]
    for x in views:
        assert not x.is_contiguous()
        u = convt_ext.im2col(x, k, d, p, s)
        ref = ref_im2col(x, k, d, p, s)
        close64(u, ref, rtol=0, atol=0)
        # Columns stored transposed (L fastest-varying last: a .transpose view).
        c = randn(ref.shape[:-2] + ref.shape[-2:][::-1], gen).transpose(-1, -2)
        assert not c.is_contiguous()
        close64(convt_ext.col2im(c, size, k, d, p, s), ref_col2im(c, size, k, d, p, s))


# ------------------------------------------------------------------ gradcheck / gradgradcheck


def _gradcheck_sets():
    g = _gen("gradcheck")
    r = lambda *shape: randn(shape, g).requires_grad_()  # noqa: E731
    L1 = window_count(7, 2, 2, 1, 2)
    L3 = window_count(3, 2, 1, 1, 1) * window_count(3, 1, 2, 0, 1) * window_count(4, 2, 1, 0, 2)
    return {
        "im2col-1d": (lambda x: convt_ext.im2col(x, (2,), (2,), (1,), (2,)), (r(2, 2, 7),)),
        "im2col-3d": (lambda x: convt_ext.im2col(x, (2, 1, 2), (1, 1, 2), (1, 0, 0), (1, 2, 1)), (r(1, 2, 3, 3, 4),)),
        "col2im-1d": (lambda c: convt_ext.col2im(c, (7,), (2,), (2,), (1,), (2,)), (r(2, 4, L1),)),
        "col2im-3d": (lambda c: convt_ext.col2im(c, (3, 3, 4), (2, 1, 2), (1, 1, 2), (1, 0, 0), (1, 2, 1)),
                      (r(1, 8, L3),)),
        "conv1d": (lambda x, w, b: convt_ext.conv1d(x, w, b, 2, 1, 2, 2), (r(2, 4, 7), r(4, 2, 2), r(4))),
        "conv1d-same": (lambda x, w, b: convt_ext.conv1d(x, w, b, 1, "same", 3, 1), (r(3, 6), r(2, 3, 2), r(2))),
        "conv3d": (lambda x, w, b: convt_ext.conv3d(x, w, b, (1, 2, 1), (1, 0, 1), (2, 1, 1), 2),
                   (r(1, 2, 3, 3, 3), r(2, 1, 2, 2, 1), r(2))),
        "conv_transpose1d": (lambda x, w, b: convt_ext.conv_transpose1d(x, w, b, 2, 1, 1, 2, 1),
                             (r(2, 4, 3), r(4, 1, 3), r(2))),
        "conv_transpose1d-op-ge-stride": (lambda x, w: convt_ext.conv_transpose1d(x, w, None, 1, 0, 2, 1, 3),
                                          (r(1, 2, 3), r(2, 2, 2))),
        "conv_transpose3d": (lambda x, w, b: convt_ext.conv_transpose3d(x, w, b, (2, 1, 1), (0, 1, 0), (1, 0, 2), 2,
                                                                        (1, 1, 3)),
                             (r(1, 2, 2, 2, 2), r(2, 1, 2, 2, 2), r(2))),
        "conv1d_weight": (lambda x, dy: convt_ext.conv1d_weight(x, (4, 1, 3), dy, 2, 1, 1, 2),
                          (r(2, 2, 7), r(2, 4, window_count(7, 3, 2, 1, 1)))),
        "conv3d_weight": (lambda x, dy: convt_ext.conv3d_weight(x, (2, 2, 2, 1, 2), dy, (1, 2, 1), (0, 1, 0), (1, 1, 2),
                                                                1),
                          (r(1, 2, 3, 3, 4), r(1, 2, window_count(3, 2, 1, 0, 1), window_count(3, 1, 2, 1, 1),
                                                  window_count(4, 2, 1, 0, 2)))),
    }


GRADCHECK_NAMES = list(_gradcheck_sets())


@pytest.mark.parametrize("name", GRADCHECK_NAMES)
def test_gradcheck_and_gradgradcheck(name):
    fn, args = _gradcheck_sets()[name]
    assert gradcheck(fn, args)
    assert gradgradcheck(fn, args)


# ------------------------------------------------------------------ opcheck


def _opcheck_sets():
    g = _gen("opcheck")
    r = lambda *shape: randn(shape, g)  # noqa: E731
    L1 = window_count(7, 3, 2, 1, 1)
    L3 = window_count(4, 2, 1, 1, 1) * window_count(3, 2, 1, 0, 2) * window_count(5, 1, 2, 1, 1)
    O3 = (window_count(4, 2, 1, 1, 1), window_count(5, 3, 2, 0, 1), window_count(3, 1, 1, 1, 2))
    return [
        ("im2col-1d", ops.im2col.default, (r(2, 3, 7), [3], [1], [1], [2])),
        ("im2col-3d", ops.im2col.default, (r(2, 2, 4, 3, 5), [2, 2, 1], [1, 2, 1], [1, 0, 1], [1, 1, 2])),
        ("col2im-1d", ops.col2im.default, (r(2, 9, L1), [7], [3], [1], [1], [2])),
        ("col2im-3d", ops.col2im.default, (r(2, 8, L3), [4, 3, 5], [2, 2, 1], [1, 2, 1], [1, 0, 1], [1, 1, 2])),
        ("conv1d", ops.conv1d.default, (r(2, 4, 9), r(6, 2, 3), r(6), [2], [1], [2], 2)),
        ("conv3d-nobias", ops.conv3d.default,
         (r(2, 2, 4, 5, 3), r(4, 1, 2, 3, 1), None, [1, 2, 1], [1, 0, 1], [1, 1, 2], 2)),
        ("conv_transpose1d", ops.conv_transpose1d.default, (r(2, 4, 3), r(4, 3, 2), r(6), [2], [1], [1], 2, [1])),
        ("conv_transpose1d-op-ge-stride", ops.conv_transpose1d.default,
         (r(1, 2, 3), r(2, 2, 2), None, [1], [0], [2], 1, [3])),
        ("conv_transpose3d", ops.conv_transpose3d.default,
         (r(2, 2, 2, 3, 2), r(2, 2, 2, 1, 2), r(4), [2, 1, 1], [0, 0, 1], [1, 0, 2], 2, [1, 1, 3])),
        ("conv1d_weight", ops.conv1d_weight.default, (r(2, 4, 9), r(2, 6, 4), [6, 2, 3], [2], [1], [2], 2)),
        ("conv3d_weight", ops.conv3d_weight.default,
         (r(2, 2, 4, 5, 3), r(2, 4, *O3), [4, 1, 2, 3, 1], [1, 2, 1], [1, 0, 1], [1, 1, 2], 2)),
    ]


OPCHECK_NAMES = ["im2col-1d", "im2col-3d", "col2im-1d", "col2im-3d", "conv1d", "conv3d-nobias", "conv_transpose1d",
                 "conv_transpose1d-op-ge-stride", "conv_transpose3d", "conv1d_weight", "conv3d_weight"]


@pytest.mark.parametrize("name", OPCHECK_NAMES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(name, requires_grad):
    sets = {n: (op, args) for n, op, args in _opcheck_sets()}
    assert sorted(sets) == sorted(OPCHECK_NAMES)
    op, args = sets[name]
    args = tuple(a.requires_grad_(requires_grad) if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(op, args)


def test_opcheck_sets_give_torch_shapes():
    """The opcheck inputs are meaningful: each op's output has torch's shape and value."""
    for name, op, args in _opcheck_sets():
        out = op(*args)
        if name.startswith("im2col"):
            close64(out, ref_im2col(args[0], *args[1:]), rtol=0, atol=0)
        elif name.startswith("col2im"):
            close64(out, ref_col2im(args[0], *args[1:]))
        elif name.startswith("conv_transpose"):
            D = args[0].dim() - 2
            x, w, b, s, p, op_, g, d = args
            close64(out, TORCH_CONVT[D](x, w, b, s, p, op_, g, d))
        elif name.endswith("_weight"):
            D = args[0].dim() - 2
            x, dy, wsize, s, p, d, g = args
            close64(out, TORCH_CONV_WEIGHT[D](x, wsize, dy, s, p, d, g))
        else:
            D = args[0].dim() - 2
            close64(out, TORCH_CONV[D](*args))


# ------------------------------------------------------------------ torch.compile


def _pipeline(D, conv, convt, im2col, col2im):
    """Every op on the same input, in independent branches (chaining them would make the
    symbolic sizes of dynamic=True nested expressions that take sympy tens of seconds)."""
    k = (2,) * D

    def f(x, w1, b1, w2, b2):
        y1 = conv(x, w1, b1, stride=2, padding=1, dilation=1, groups=2)
        y2 = convt(torch.tanh(x), w2, b2, stride=2, padding=1, output_padding=1, groups=1, dilation=1)
        cols = im2col(x, k, dilation=1, padding=(1,) * D, stride=(1,) * D)
        z = col2im(cols * 2, x.shape[2:], k, 1, (1,) * D, 1)
        return y1, y2, z

    return f


def _ref_im2col_api(x, kernel_size, dilation=1, padding=0, stride=1):
    D = len(kernel_size)
    expand = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,) * D  # noqa: E731
    x_ = x
    k, d, p, s = expand(kernel_size), expand(dilation), expand(padding), expand(stride)
    eye = torch.eye(math.prod(k), dtype=x.dtype).reshape((math.prod(k), 1) + k)
    c = x_.shape[1]
    w = eye.repeat((c, 1) + (1,) * D)
    return TORCH_CONV[D](x_, w, None, s, p, d, c).reshape(x_.shape[0], c * math.prod(k), -1)


def _ref_col2im_api(cols, output_size, kernel_size, dilation=1, padding=0, stride=1):
    # Differentiable reference fold: conv_transpose with the same one-hot kernel.
    D = len(kernel_size)
    expand = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,) * D  # noqa: E731
    k, d, p, s = expand(kernel_size), expand(dilation), expand(padding), expand(stride)
    K = math.prod(k)
    n, c = cols.shape[0], cols.shape[1] // K
    size = tuple(int(v) for v in output_size)
    out = [window_count(size[j], k[j], s[j], p[j], d[j]) for j in range(D)]
    natural = [transposed_size(out[j], k[j], s[j], p[j], 0, d[j]) for j in range(D)]
    opad = tuple(size[j] - natural[j] for j in range(D))
    eye = torch.eye(K, dtype=cols.dtype).reshape((K, 1) + k)
    w = eye.repeat((c, 1) + (1,) * D)
    return TORCH_CONVT[D](cols.reshape((n, c * K) + tuple(out)), w, None, s, p, opad, c, d)


def _compile_check(compiled, D, shapes):
    gen = _gen(f"compile-{D}")
    eager_ours = _pipeline(D, ours("conv{D}d", D), ours("conv_transpose{D}d", D), convt_ext.im2col, convt_ext.col2im)
    eager_ref = _pipeline(D, TORCH_CONV[D], TORCH_CONVT[D], _ref_im2col_api, _ref_col2im_api)
    w1, b1 = randn((6, 2) + (3,) * D, gen), randn((6,), gen)
    w2, b2 = randn((4, 3) + (3,) * D, gen), randn((3,), gen)
    for shape in shapes:
        x = randn(shape, gen)
        leaves = [t.clone().requires_grad_() for t in (x, w1, b1, w2, b2)]
        ys = compiled(*leaves)
        gs = [randn(y.shape, gen) for y in ys]
        grads = torch.autograd.grad(ys, leaves, gs)
        for fn in (eager_ref, eager_ours):
            ys_ref = fn(*leaves)
            for y, y_ref in zip(ys, ys_ref):
                close64(y, y_ref)
            for a, b in zip(grads, torch.autograd.grad(ys_ref, leaves, gs)):
                close64(a, b)


# No size 0 or 1 and no size shared with another size of the inputs, weights included
# (dynamo specialises 0/1 and duck-sizes equal sizes), so that dynamic=True compiles once.
COMPILE_SHAPES = {1: [(5, 4, 9), (7, 4, 12), (8, 4, 11)], 3: [(5, 4, 7, 8, 9), (7, 4, 9, 7, 8), (8, 4, 5, 9, 7)]}


@pytest.mark.parametrize("D", [1, 3])
@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_eager_backend(D, dynamic):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")
    f = _pipeline(D, ours("conv{D}d", D), ours("conv_transpose{D}d", D), convt_ext.im2col, convt_ext.col2im)
    compiled = torch.compile(f, fullgraph=True, backend=counter, dynamic=dynamic)
    _compile_check(compiled, D, COMPILE_SHAPES[D] if dynamic else COMPILE_SHAPES[D][:1])
    assert counter.frame_count == 1


def test_compile_fullgraph_aot_eager_dynamic():
    torch._dynamo.reset()
    f = _pipeline(1, convt_ext.conv1d, convt_ext.conv_transpose1d, convt_ext.im2col, convt_ext.col2im)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)
    _compile_check(compiled, 1, COMPILE_SHAPES[1][:2])


def test_fake_kernels_give_real_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    cases = [
        (TORCH_CONV[1], convt_ext.conv1d, (2, 4, 9), (6, 2, 3), dict(stride=2, padding=1, dilation=2, groups=2)),
        (TORCH_CONV[1], convt_ext.conv1d, (4, 9), (6, 4, 4), dict(padding="same", dilation=2)),
        (TORCH_CONV[3], convt_ext.conv3d, (2, 4, 5, 6, 7), (6, 2, 3, 2, 1),
         dict(stride=(1, 2, 3), padding=(1, 0, 1), groups=2)),
        (TORCH_CONV[3], convt_ext.conv3d, (2, 5, 6, 7), (6, 2, 2, 3, 4), dict(padding="same", dilation=(1, 2, 1))),
        (TORCH_CONVT[1], convt_ext.conv_transpose1d, (2, 4, 3), (4, 3, 3),
         dict(stride=2, padding=1, output_padding=1, groups=2)),
        (TORCH_CONVT[3], convt_ext.conv_transpose3d, (1, 2, 3, 3, 2), (2, 2, 2, 2, 2),
         dict(stride=(1, 2, 1), output_padding=(2, 1, 0), dilation=(3, 1, 1))),
    ]
    for ref_fn, fn, xs, ws, kwargs in cases:
        ref = ref_fn(torch.zeros(xs), torch.zeros(ws), **kwargs)
        with FakeTensorMode():
            out = fn(torch.empty(xs), torch.empty(ws), **kwargs)
        assert tuple(out.shape) == tuple(ref.shape)
    with FakeTensorMode():
        u1 = convt_ext.im2col(torch.empty(2, 3, 9), (3,), 2, 1, 2)
        u3 = convt_ext.im2col(torch.empty(2, 3, 4, 5, 6), (2, 3, 1), 1, (1, 0, 0), (1, 2, 3))
        f1 = convt_ext.col2im(torch.empty(2, 9, 4), (9,), 3, 2, 1, 2)
        f3 = convt_ext.col2im(torch.empty(3 * 6, 5 * 2 * 2), (4, 5, 6), (2, 3, 1), 1, (1, 0, 0), (1, 2, 3))
    assert tuple(u1.shape) == (2, 9, 4)
    assert tuple(u3.shape) == (2, 18, 5 * 2 * 2)
    assert tuple(f1.shape) == (2, 3, 9)
    assert tuple(f3.shape) == (3, 4, 5, 6)


# ------------------------------------------------------------------ modules

DT = torch.float64


def _module_pair(torch_cls, our_cls, kwargs, via, seed):
    torch.manual_seed(seed)
    ref = torch_cls(**kwargs, dtype=DT)
    if via == "from_torch":
        mod = our_cls.from_torch(ref)
    else:
        mod = our_cls(**kwargs, dtype=DT)
        mod.load_state_dict(ref.state_dict(), strict=True)
    assert type(mod) is our_cls and isinstance(mod, torch_cls)
    assert list(mod.state_dict()) == list(ref.state_dict())
    for (n1, p1), (n2, p2) in zip(mod.named_parameters(), ref.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2) and p1.data_ptr() != p2.data_ptr()
    return mod, ref


def _module_parity(mod, ref, x, gen, **fwd):
    """Output and the gradients wrt input and every parameter, ours vs torch's."""
    results = []
    for m in (mod, ref):
        xl = x.detach().clone().requires_grad_()
        y = m(xl, **fwd)
        results.append((xl, y, [p for _, p in m.named_parameters()]))
    (xa, ya, pa), (xb, yb, pb) = results
    close64(ya, yb)
    g = randn(yb.shape, gen)
    ga = torch.autograd.grad(ya, [xa] + pa, g)
    gb = torch.autograd.grad(yb, [xb] + pb, g)
    assert len(ga) == len(gb) == 1 + len(pb)
    for a, b in zip(ga, gb):
        close64(a, b)
    return ya


CONV_MODULE_CONFIGS = [
    (1, dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, groups=2), (3, 4, 11)),
    (1, dict(in_channels=3, out_channels=2, kernel_size=4, padding="same", dilation=2, bias=False), (2, 3, 9)),
    (1, dict(in_channels=2, out_channels=3, kernel_size=3, padding=2, dilation=2), (2, 10)),  # unbatched
    (3, dict(in_channels=2, out_channels=4, kernel_size=(2, 3, 1), stride=(1, 2, 1), padding=(1, 0, 1),
             dilation=(2, 1, 1), groups=2), (2, 2, 5, 6, 4)),
    (3, dict(in_channels=2, out_channels=3, kernel_size=(2, 3, 2), padding="same"), (1, 2, 4, 5, 4)),
    (3, dict(in_channels=3, out_channels=2, kernel_size=2, stride=2, padding=1, bias=False), (3, 4, 5, 3)),  # unbatched
]


PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]


@pytest.mark.parametrize("index", range(len(CONV_MODULE_CONFIGS)))
@pytest.mark.parametrize("padding_mode", PADDING_MODES)
def test_conv_modules_match_torch(index, padding_mode):
    # from_torch and load_state_dict alternate over the (config, padding_mode) grid.
    via = ("from_torch", "load_state_dict")[(index + PADDING_MODES.index(padding_mode)) % 2]
    D, kwargs, xshape = CONV_MODULE_CONFIGS[index]
    kwargs = dict(kwargs, padding_mode=padding_mode)
    gen = _gen(f"conv-module-{index}-{padding_mode}-{via}")
    torch_cls = {1: torch.nn.Conv1d, 3: torch.nn.Conv3d}[D]
    our_cls = {1: convt_ext.nn.Conv1d, 3: convt_ext.nn.Conv3d}[D]
    mod, ref = _module_pair(torch_cls, our_cls, kwargs, via, seed=index)
    x = randn(xshape, gen)
    _module_parity(mod, ref, x, gen)
    assert repr(mod).split("(", 1)[1] == repr(ref).split("(", 1)[1]


CONVT_MODULE_CONFIGS = [
    (1, dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, output_padding=1, groups=2), (3, 4, 5)),
    (1, dict(in_channels=2, out_channels=2, kernel_size=2, stride=1, output_padding=2, dilation=3, bias=False),
     (2, 2, 4)),
    (1, dict(in_channels=3, out_channels=2, kernel_size=3, stride=3, padding=1), (3, 4)),  # unbatched
    (3, dict(in_channels=2, out_channels=4, kernel_size=(2, 3, 1), stride=(2, 1, 2), padding=(0, 1, 0),
             output_padding=(1, 0, 1), groups=2, dilation=(1, 1, 2)), (2, 2, 3, 3, 2)),
    (3, dict(in_channels=2, out_channels=1, kernel_size=2, stride=(1, 2, 1), output_padding=(2, 1, 0),
             dilation=(3, 1, 1)), (1, 2, 2, 3, 2)),
    (3, dict(in_channels=3, out_channels=2, kernel_size=2, stride=2, padding=1, bias=False), (3, 2, 3, 2)),  # unbatched
]


@pytest.mark.parametrize("index", range(len(CONVT_MODULE_CONFIGS)))
@pytest.mark.parametrize("via", ["from_torch", "load_state_dict"])
def test_conv_transpose_modules_match_torch(index, via):
    D, kwargs, xshape = CONVT_MODULE_CONFIGS[index]
    gen = _gen(f"convt-module-{index}-{via}")
    torch_cls = {1: torch.nn.ConvTranspose1d, 3: torch.nn.ConvTranspose3d}[D]
    our_cls = {1: convt_ext.nn.ConvTranspose1d, 3: convt_ext.nn.ConvTranspose3d}[D]
    mod, ref = _module_pair(torch_cls, our_cls, kwargs, via, seed=100 + index)
    x = randn(xshape, gen)
    y = _module_parity(mod, ref, x, gen)
    # forward(input, output_size): every reachable size, spatial-only and full-shape forms.
    natural = y.shape[-D:]
    stride = kwargs["stride"] if isinstance(kwargs["stride"], tuple) else (kwargs["stride"],) * D
    extra = [s - 1 for s in stride]
    base = [natural[j] - (kwargs.get("output_padding", 0) if isinstance(kwargs.get("output_padding", 0), int)
                          else kwargs["output_padding"][j]) for j in range(D)]
    targets = [tuple(base[j] + extra[j] for j in range(D)), tuple(base)]
    for target in targets:
        _module_parity(mod, ref, x, gen, output_size=list(target))
        _module_parity(mod, ref, x, gen, output_size=tuple(y.shape[:-D]) + target)


def _unfold_cases():
    return [
        (1, dict(kernel_size=(3,), dilation=2, padding=1, stride=2), (2, 3, 11)),
        (1, dict(kernel_size=2, dilation=(1,), padding=0, stride=1), (3, 7)),  # 2-d input + a 1-sequence: unbatched 1-d
        (2, dict(kernel_size=(2, 3), dilation=(1, 2), padding=1, stride=(2, 1)), (2, 3, 6, 7)),
        (2, dict(kernel_size=3, padding=1), (3, 5, 6)),  # unbatched 2-d, ints
        (3, dict(kernel_size=(2, 1, 3), dilation=(1, 2, 1), padding=(1, 0, 1), stride=(1, 1, 2)), (2, 2, 4, 5, 6)),
        (3, dict(kernel_size=2, stride=2), (1, 2, 4, 4, 5)),  # 5-d input with ints
        (3, dict(kernel_size=(2, 2, 2)), (2, 3, 4, 5)),  # unbatched 3-d
    ]


@pytest.mark.parametrize("index", range(len(_unfold_cases())))
def test_unfold_fold_modules(index):
    D, kwargs, xshape = _unfold_cases()[index]
    gen = _gen(f"unfold-module-{index}")
    size = xshape[-D:]
    expand = lambda v: tuple(v) if isinstance(v, tuple) else (v,) * D  # noqa: E731
    k, d, p, s = (expand(kwargs.get(n, dflt)) for n, dflt in
                  (("kernel_size", None), ("dilation", 1), ("padding", 0), ("stride", 1)))
    unfold = convt_ext.nn.Unfold(**kwargs)
    fold = convt_ext.nn.Fold(output_size=size, **kwargs)
    assert isinstance(unfold, torch.nn.Module) and isinstance(fold, torch.nn.Module)
    x = randn(xshape, gen).requires_grad_()
    u = unfold(x)
    if D == 2:
        ref = torch.nn.Unfold(**kwargs)(x.detach())
    else:
        ref = ref_im2col(x, k, d, p, s)
    close64(u, ref, rtol=0, atol=0)
    g = randn(u.shape, gen)
    (gx,) = torch.autograd.grad(u, x, g)
    close64(gx, ref_col2im(g, size, k, d, p, s))
    c = randn(ref.shape, gen).requires_grad_()
    y = fold(c)
    want = torch.nn.Fold(output_size=size, **kwargs)(c.detach()) if D == 2 else ref_col2im(c, size, k, d, p, s)
    close64(y, want)
    gy = randn(y.shape, gen)
    (gc,) = torch.autograd.grad(y, c, gy)
    close64(gc, ref_im2col(gy, k, d, p, s), rtol=0, atol=0)
    # Fold with output_size a sequence: D from it even with int kernel_size etc.
    if D != 2:
        fold2 = convt_ext.nn.Fold(output_size=list(size), kernel_size=k[0] if len(set(k)) == 1 else k,
                                  dilation=d, padding=p, stride=s)
        close64(fold2(c.detach()), want)


def test_module_classes_are_torch_subclasses():
    for ours_, theirs in [("Conv1d", torch.nn.Conv1d), ("Conv3d", torch.nn.Conv3d),
                          ("ConvTranspose1d", torch.nn.ConvTranspose1d), ("ConvTranspose3d", torch.nn.ConvTranspose3d)]:
        assert issubclass(getattr(convt_ext.nn, ours_), theirs)
    with pytest.raises(TypeError):
        convt_ext.nn.Conv1d.from_torch(torch.nn.Conv3d(1, 1, 1))


# ------------------------------------------------------------------ argument errors


def _tt(*shape):
    return torch.zeros(shape, dtype=torch.float64)


IM2COL_ERRORS = [
    # Wrong tuple length for the input's dim: names the argument.
    ((_tt(1, 2, 5, 5, 5),), dict(kernel_size=(3, 3)), r"kernel_size"),
    ((_tt(2, 3, 5),), dict(kernel_size=(3, 3, 3)), r"kernel_size|input"),
    # Mismatched sequence lengths among the arguments.
    ((_tt(1, 2, 5, 5),), dict(kernel_size=(3, 3), stride=(1, 1, 1)), r"kernel_size|stride"),
    ((_tt(1, 2, 5),), dict(kernel_size=(3,), dilation=(1, 1)), r"kernel_size|dilation"),
    ((_tt(1, 2, 5, 5, 5),), dict(kernel_size=3, padding=(1, 1), stride=(1, 1, 1)), r"padding|stride"),
    ((_tt(1, 2, 5, 5, 5),), dict(kernel_size=(2, 2, 2), padding=(0, 0)), r"kernel_size|padding"),
    # Input of the wrong dim.
    ((_tt(5),), dict(kernel_size=3), r"input"),
    ((_tt(1, 1, 2, 5, 5, 5),), dict(kernel_size=3), r"input"),
    ((_tt(1, 1, 2, 5, 5, 5),), dict(kernel_size=(2, 2, 2)), r"input"),
]


@pytest.mark.parametrize("args,kwargs,match", IM2COL_ERRORS)
def test_im2col_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        convt_ext.im2col(*args, **kwargs)


COL2IM_ERRORS = [
    ((_tt(1, 8, 27), (5, 5, 5)), dict(kernel_size=(2, 2)), r"kernel_size|output_size"),
    ((_tt(1, 3, 4), (6,)), dict(kernel_size=3, stride=(1, 1)), r"stride|output_size"),
    ((_tt(1, 1, 3, 4), (6,)), dict(kernel_size=3), r"input"),
    ((_tt(12), (6,)), dict(kernel_size=3), r"input"),
    ((_tt(1, 2, 9, 4), (6,)), dict(kernel_size=(3,)), r"input"),
]


@pytest.mark.parametrize("args,kwargs,match", COL2IM_ERRORS)
def test_col2im_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        convt_ext.col2im(*args, **kwargs)


TV = (TypeError, ValueError)  # a wrong-length tuple: either, as long as the argument is named
X1, X3 = _tt(1, 2, 8), _tt(1, 2, 4, 4, 4)
CONV_ND_ERRORS = [
    # (function name, args, kwargs, exception(s), match, torch function or None)
    ("conv1d", (_tt(1, 2, 3, 8), _tt(3, 2, 2)), {}, ValueError, r"input", F.conv1d),
    ("conv1d", (_tt(8), _tt(3, 2, 2)), {}, ValueError, r"input", F.conv1d),
    ("conv1d", (X1, _tt(3, 2, 2, 2)), {}, ValueError, r"weight", F.conv1d),
    ("conv1d", (X1, _tt(3, 2, 2)), dict(stride=(1, 1)), TV, r"stride", None),
    ("conv1d", (X1, _tt(3, 2, 2)), dict(padding=(1, 1)), TV, r"padding", None),
    ("conv1d", (X1, _tt(3, 2, 2)), dict(dilation=(1, 1, 1)), TV, r"dilation", None),
    ("conv3d", (_tt(4, 4, 4, 4), _tt(3, 2, 2, 2, 2)), {}, ValueError, r"input|weight", F.conv3d),  # channels 4 != 2
    ("conv3d", (_tt(4, 4, 4), _tt(3, 2, 2, 2, 2)), {}, ValueError, r"input", F.conv3d),
    ("conv3d", (_tt(1, 1, 2, 4, 4, 4), _tt(3, 2, 2, 2, 2)), {}, ValueError, r"input", F.conv3d),
    ("conv3d", (X3, _tt(3, 2, 2, 2)), {}, ValueError, r"weight", F.conv3d),
    ("conv3d", (X3, _tt(3, 2, 2, 2, 2)), dict(stride=(1, 1)), TV, r"stride", None),
    ("conv3d", (X3, _tt(3, 2, 2, 2, 2)), dict(padding=(1, 1, 1, 1)), TV, r"padding", None),
    ("conv3d", (X3, _tt(3, 2, 2, 2, 2)), dict(padding="same", stride=2), ValueError, r"same|stride", F.conv3d),
    ("conv_transpose1d", (_tt(1, 2, 3, 8), _tt(2, 3, 2)), {}, ValueError, r"input", F.conv_transpose1d),
    ("conv_transpose1d", (X1, _tt(2, 3, 2)), dict(output_padding=1), ValueError, r"output_padding", F.conv_transpose1d),
    ("conv_transpose1d", (X1, _tt(2, 3, 2)), dict(output_padding=(0, 0)), TV, r"output_padding", None),
    ("conv_transpose3d", (_tt(2, 4), _tt(2, 3, 2, 2, 2)), {}, ValueError, r"input", F.conv_transpose3d),
    ("conv_transpose3d", (X3, _tt(2, 3, 2, 2)), {}, ValueError, r"weight", F.conv_transpose3d),
    ("conv_transpose3d", (X3, _tt(2, 3, 2, 2, 2)), dict(stride=2, output_padding=(0, 2, 0)), ValueError,
     r"output_padding", F.conv_transpose3d),
    ("conv_transpose3d", (X3, _tt(2, 3, 2, 2, 2)), dict(dilation=(1, 1)), TV, r"dilation", None),
]


@pytest.mark.parametrize("name,args,kwargs,exc,match,torch_fn", CONV_ND_ERRORS,
                         ids=[f"{i}-{row[0]}-{row[4]}" for i, row in enumerate(CONV_ND_ERRORS)])
def test_conv_nd_errors(name, args, kwargs, exc, match, torch_fn):
    with pytest.raises(exc, match=match):
        getattr(convt_ext, name)(*args, **kwargs)
    if torch_fn is not None:  # the geometry is one torch rejects too
        with pytest.raises(Exception):
            torch_fn(*args, **kwargs)


def test_dispatcher_op_errors():
    """The torch.ops forms: list lengths must agree (they give D), convolutions are batched only."""
    x1, x3 = _tt(2, 3, 8), _tt(2, 3, 4, 5, 6)
    with pytest.raises(ValueError, match=r"dilation|kernel_size"):
        ops.im2col(x1, [3], [1, 1], [0], [1])
    with pytest.raises(ValueError, match=r"stride|output_size"):
        ops.col2im(_tt(2, 9, 6), [8], [3], [1], [0], [1, 1])
    with pytest.raises(ValueError, match=r"stride"):
        ops.conv3d(x3, _tt(2, 3, 2, 2, 2), None, [1, 1], [0, 0, 0], [1, 1, 1], 1)
    with pytest.raises(ValueError, match=r"output_padding"):
        ops.conv_transpose1d(x1, _tt(3, 2, 2), None, [1], [0], [0, 0], 1, [1])
    with pytest.raises(ValueError, match=r"input"):
        ops.conv1d(x1[0], _tt(2, 3, 2), None, [1], [0], [1], 1)
    with pytest.raises(ValueError, match=r"input"):
        ops.conv_transpose3d(x3[0], _tt(3, 2, 2, 2, 2), None, [1] * 3, [0] * 3, [0] * 3, 1, [1] * 3)


# ------------------------------------------------------------------ float16 / bfloat16

LOWP_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("D", [1, 3])
def test_lower_precision_convolutions(D, dtype):
    gen = _gen(f"lowp-{D}-{dtype}")
    tol = LOWP_TOL[dtype]
    xshape = (2, 4) + ((9,) if D == 1 else (4, 5, 3))
    x = randn(xshape, gen).to(dtype)
    w = randn((6, 2) + ((3,) if D == 1 else (2, 3, 1)), gen).to(dtype)
    b = randn((6,), gen).to(dtype)
    kw = dict(stride=(2,) + (1,) * (D - 1), padding=1, dilation=(1,) + (2,) * (D - 1), groups=2)
    xl, wl, bl = (t.clone().requires_grad_() for t in (x, w, b))
    y = ours("conv{D}d", D)(xl, wl, bl, **kw)
    assert y.dtype == dtype
    xr, wr, br = (t.double().requires_grad_() for t in (x, w, b))
    yr = TORCH_CONV[D](xr, wr, br, **kw)
    close_lowp(y, yr, tol)
    gy = randn(yr.shape, gen).to(dtype)
    got = torch.autograd.grad(y, (xl, wl, bl), gy)
    want = torch.autograd.grad(yr, (xr, wr, br), gy.double())
    for a, r in zip(got, want):
        assert a.dtype == dtype
        close_lowp(a, r, tol)

    wt = randn((4, 3) + ((3,) if D == 1 else (2, 2, 3)), gen).to(dtype)
    bt = randn((6,), gen).to(dtype)
    kwt = dict(stride=2, padding=1, output_padding=1, groups=2, dilation=1)
    xl, wl, bl = (t.clone().requires_grad_() for t in (x, wt, bt))
    y = ours("conv_transpose{D}d", D)(xl, wl, bl, **kwt)
    assert y.dtype == dtype
    xr, wr, br = (t.double().requires_grad_() for t in (x, wt, bt))
    yr = TORCH_CONVT[D](xr, wr, br, **kwt)
    close_lowp(y, yr, tol)
    gy = randn(yr.shape, gen).to(dtype)
    got = torch.autograd.grad(y, (xl, wl, bl), gy)
    want = torch.autograd.grad(yr, (xr, wr, br), gy.double())
    for a, r in zip(got, want):
        assert a.dtype == dtype
        close_lowp(a, r, tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("D", [1, 3])
def test_lower_precision_im2col_col2im(D, dtype):
    gen = _gen(f"lowp-im2col-{D}-{dtype}")
    tol = LOWP_TOL[dtype]
    if D == 1:
        size, k, d, p, s = (11,), (3,), (2,), (1,), (2,)
    else:
        size, k, d, p, s = (4, 5, 4), (2, 3, 2), (1, 1, 2), (1, 0, 1), (1, 2, 1)
    x = randn((2, 3) + size, gen).to(dtype)
    u = convt_ext.im2col(x, k, d, p, s)
    assert u.dtype == dtype
    ref = ref_im2col(x, k, d, p, s)
    close64(u.double(), ref, rtol=0, atol=0)  # a copy: exact in any dtype
    c = randn(ref.shape, gen).to(dtype)
    y = convt_ext.col2im(c, size, k, d, p, s)
    assert y.dtype == dtype
    close_lowp(y, ref_col2im(c, size, k, d, p, s), tol)
    # Gradients in the same dtype.
    xl = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(convt_ext.im2col(xl, k, d, p, s), xl, c)
    assert gx.dtype == dtype
    close_lowp(gx, ref_col2im(c, size, k, d, p, s), tol)
