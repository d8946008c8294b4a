"""The GEMM engine layer (Note [The GEMM engine] in csrc/gemm.h) and the
shared column buffer of conv_transpose's backward.

Every engine must give torch's results (computed by torch in float64 from the
same float32 values) on every path of every convolution: the wide path (few
window positions, several samples), the block path, grouped GEMMs, 1x1
layers, channels_last pixel rows, and the weight gradient. Each test also
checks, through engine_info()'s call counters, that the engine it forces
actually ran GEMMs, so a silent fallback to at::mm cannot pass for it.
"""
import itertools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import convt_ext
from conftest import requires_cuda, tf32_state
from tf32_bounds import check_within, relative_error, tf32_was_used

ENGINES = convt_ext.engine_info()["available"]


@pytest.fixture(autouse=True)
def _restore_engine():
    """The engines multiply the column path's GEMMs: every test here runs on
    it (the view path's own GEMMs are tests/test_view_path.py's)."""
    before, path = convt_ext.gemm_engine(), convt_ext.conv_path()
    convt_ext.set_conv_path("columns")
    yield
    convt_ext.set_gemm_engine(before)
    convt_ext.set_conv_path(path)


def _calls():
    return dict(convt_ext.engine_info()["calls"])


# (dims, N, C_in, C_out, groups, size, kernel, stride, padding, dilation, output_padding)
LAYERS = [
    (2, 4, 8, 6, 1, 6, 3, 1, 1, 1, 0),  # few positions: the wide path
    (2, 2, 6, 4, 2, 40, 3, 2, 1, 1, 1),  # 400+ positions, grouped: blocks
    (2, 3, 8, 12, 1, 9, 1, 1, 0, 1, 0),  # 1x1: the image is its own columns
    (1, 3, 4, 6, 2, 50, 5, 2, 2, 2, 1),
    (3, 2, 4, 4, 1, 6, 3, 2, 1, 1, 1),
]


def _fns(d):
    return (
        getattr(convt_ext, f"conv{d}d"),
        getattr(F, f"conv{d}d"),
        getattr(convt_ext, f"conv_transpose{d}d"),
        getattr(F, f"conv_transpose{d}d"),
    )


def _run_layer(layer, memory_format=None):
    """Our conv and conv_transpose in float32, forward and every gradient,
    against torch in float64 on the same values; returns nothing, asserts."""
    d, n, ci, co, g, size, k, s, p, dl, op = layer
    conv, tconv, convt, tconvt = _fns(d)
    gen = torch.Generator().manual_seed(hash(layer) % 1000)
    x = torch.randn(n, ci, *([size] * d), generator=gen)
    w = torch.randn(co, ci // g, *([k] * d), generator=gen)
    b = torch.randn(co, generator=gen)
    if memory_format is not None:
        x = x.to(memory_format=memory_format)
        w = w.to(memory_format=memory_format)

    def check(ours, theirs, args, **kw):
        ins = [a.clone().requires_grad_() for a in args]
        ref = [a.double().requires_grad_() for a in args]
        y = ours(*ins, **kw)
        r = theirs(*ref, **kw)
        torch.testing.assert_close(y, r.float(), atol=2e-4, rtol=2e-4)
        gy = torch.randn(r.shape, generator=gen)
        got = torch.autograd.grad(y, ins, gy)
        want = torch.autograd.grad(r, ref, gy.double())
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e.float(), atol=2e-3, rtol=2e-3)

    check(conv, tconv, (x, w, b), stride=s, padding=p, dilation=dl, groups=g)
    wt = torch.randn(ci, co // g, *([k] * d), generator=gen)
    xt = torch.randn(n, ci, *([max(2, size // 2)] * d), generator=gen)
    bt = torch.randn(co, generator=gen)
    check(convt, tconvt, (xt, wt, bt), stride=s, padding=p, output_padding=op if s > op or dl > op else 0,
          groups=g, dilation=dl)


@pytest.mark.parametrize("engine", ["aten", "onednn", "brgemm", "benchmark", "auto"])
@pytest.mark.parametrize("layer", LAYERS, ids=lambda l: f"{l[0]}d-n{l[1]}-g{l[4]}-s{l[5]}-k{l[6]}")
def test_engine_matches_torch(engine, layer):
    if engine in ("onednn", "brgemm") and engine not in ENGINES:
        pytest.skip(f"{engine} does not run on this CPU/build")
    convt_ext.set_gemm_engine(engine)
    before = _calls()
    _run_layer(layer)
    after = _calls()
    ran = {e: after[e] - before[e] for e in after}
    assert sum(ran.values()) > 0
    if engine == "onednn":
        # oneDNN runs every float32 GEMM: any operand layout.
        assert ran["onednn"] > 0 and ran["brgemm"] == 0
    elif engine == "brgemm":
        # The ukernel takes row-major operands only: conv's forward GEMM.
        assert ran["brgemm"] > 0 and ran["onednn"] == 0
    elif engine == "aten":
        assert ran["onednn"] == 0 and ran["brgemm"] == 0


@pytest.mark.parametrize("engine", [e for e in ("aten", "onednn", "brgemm")])
def test_engine_channels_last(engine):
    if engine not in ENGINES:
        pytest.skip(f"{engine} does not run here")
    convt_ext.set_gemm_engine(engine)
    before = _calls()
    # 1x1 layers on channels_last input: GEMMs on the (N*L, C) pixel rows.
    _run_layer((2, 2, 8, 12, 2, 7, 1, 1, 0, 1, 0), torch.channels_last)
    _run_layer((2, 3, 6, 4, 1, 8, 3, 2, 1, 1, 1), torch.channels_last)
    ran = _calls()[engine] - before[engine]
    assert ran > 0


def test_float64_and_half_fall_back_to_aten():
    """oneDNN and the ukernel take float32 (oneDNN also half types where the
    CPU has the instructions); float64 always runs on at::mm."""
    for engine in ENGINES:
        convt_ext.set_gemm_engine(engine)
        x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
        w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
        before = _calls()
        y = convt_ext.conv2d(x, w, padding=1)
        after = _calls()
        torch.testing.assert_close(y, F.conv2d(x, w, padding=1), atol=1e-12, rtol=1e-12)
        assert after["aten"] > before["aten"]
        assert after["onednn"] == before["onednn"] and after["brgemm"] == before["brgemm"]


def test_bfloat16_every_engine():
    x = torch.randn(2, 8, 10, 10)
    w = torch.randn(4, 8, 3, 3)
    ref = F.conv2d(x.bfloat16().double(), w.bfloat16().double(), padding=1)
    for engine in ENGINES:
        convt_ext.set_gemm_engine(engine)
        y = convt_ext.conv2d(x.bfloat16(), w.bfloat16(), padding=1)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.double(), ref, atol=0.3, rtol=0.02)


@pytest.mark.parametrize("engine", ["aten", "onednn", "brgemm"])
def test_engine_bits_do_not_depend_on_thread_count(engine):
    if engine not in ENGINES:
        pytest.skip(f"{engine} does not run here")
    """1, 2, 3 and 4 threads, on shapes that include those whose weight gradients differed on an
    Intel AVX-512 CPU when MKL followed torch's thread setting: the same bits, and every GEMM on
    an engine whose bits cannot depend on the thread setting (the counters say which ran)."""
    convt_ext.set_gemm_engine(engine)
    gen = torch.Generator().manual_seed(3)
    shapes = [((3, 8, 20, 20), 8, 3), ((3, 40, 37, 29), 40, 3), ((7, 96, 15, 15), 96, 1), ((8, 32, 20, 20), 32, 3)]
    threads = torch.get_num_threads()
    for dtype in (torch.float32, torch.float64):
        for xs, c, k in shapes:
            x = torch.randn(xs, generator=gen, dtype=dtype)
            w = torch.randn(c, c, k, k, generator=gen, dtype=dtype)
            dy = torch.randn(xs[0], c, xs[2], xs[3], generator=gen, dtype=dtype)
            before = convt_ext.engine_info()
            results = []
            try:
                for t in (1, 2, 3, 4):
                    torch.set_num_threads(t)
                    results.append(
                        (
                            convt_ext.conv2d(x, w, padding=k // 2),
                            convt_ext.conv2d_weight(x, w.shape, dy, padding=k // 2),
                            convt_ext.conv_transpose2d(x, w, padding=k // 2),
                        )
                    )
            finally:
                torch.set_num_threads(threads)
            after = convt_ext.engine_info()
            for other in results[1:]:
                for a, b in zip(results[0], other):
                    assert torch.equal(a, b), (dtype, xs)
            ran = {e: after["calls"][e] - before["calls"][e] for e in after["calls"]}
            want = engine if dtype == torch.float32 else "aten"  # float64 runs on aten alone
            assert ran[want] > 0, (engine, dtype, ran)
            assert after["thread_dependent_calls"] == before["thread_dependent_calls"], (dtype, xs)
            assert all(after["thread_independent"][e] for e, n in ran.items() if n > 0)


def test_benchmark_mode_times_and_keeps_the_fastest():
    convt_ext.set_gemm_engine("benchmark")
    x = torch.randn(2, 16, 33, 31)
    w = torch.randn(24, 16, 3, 3)
    y = convt_ext.conv2d(x, w, padding=1)
    torch.testing.assert_close(y, F.conv2d(x, w, padding=1), atol=2e-4, rtol=2e-4)
    rows = [r for r in convt_ext.engine_info()["benchmarked"] if r["m"] == 24 and r["k"] == 16 * 9]
    assert rows, convt_ext.engine_info()["benchmarked"]
    for r in rows:
        assert set(r["seconds"]) <= set(ENGINES) and "aten" in r["seconds"]
        assert all(s > 0 for s in r["seconds"].values())
        assert r["engine"] == min(r["seconds"], key=r["seconds"].get)
    # The choice is kept: a second call times nothing new.
    count = len(convt_ext.engine_info()["benchmarked"])
    convt_ext.conv2d(x, w, padding=1)
    assert len(convt_ext.engine_info()["benchmarked"]) == count


def test_benchmark_mode_is_the_rule_under_deterministic_algorithms():
    convt_ext.set_gemm_engine("benchmark")
    x = torch.randn(2, 5, 17, 19)
    w = torch.randn(7, 5, 3, 3)
    count = len(convt_ext.engine_info()["benchmarked"])
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        y = convt_ext.conv2d(x, w, padding=1)
    finally:
        torch.use_deterministic_algorithms(was)
    torch.testing.assert_close(y, F.conv2d(x, w, padding=1), atol=2e-4, rtol=2e-4)
    assert len(convt_ext.engine_info()["benchmarked"]) == count


def test_rule():
    rule = convt_ext._C.rule_engine
    # MKL runs its AVX2 code on AMD CPUs with AVX-512: oneDNN's ukernel there (measured on a
    # Zen 4; the matmul's boxed call per GEMM made it the slowest engine).
    assert rule("cpu", "float32", True, "AuthenticAMD", True) == "brgemm"
    assert rule("cpu", "float32", True, "GenuineIntel", True) == "aten"
    assert rule("cpu", "float32", False, "AuthenticAMD", True) == "aten"  # AVX2: MKL is fastest
    assert rule("cpu", "float32", True, "AuthenticAMD", False) == "aten"  # no ukernel in torch
    assert rule("cpu", "float64", True, "AuthenticAMD", True) == "aten"
    assert rule("cpu", "bfloat16", True, "AuthenticAMD", True) == "aten"
    assert rule("cuda", "float32", True, "AuthenticAMD", True) == "aten"
    # The rule never picks oneDNN's matmul.
    for args in itertools.product(("cpu", "cuda"), ("float32", "float64", "bfloat16", "float16"), (True, False),
                                  ("AuthenticAMD", "GenuineIntel", "HygonGenuine"), (True, False)):
        assert rule(*args) in ("aten", "brgemm"), args
    info = convt_ext.engine_info()
    expected = rule("cpu", "float32", info["cpu_avx512"], info["cpu_vendor"], "brgemm" in info["available"])
    assert info["rule"]["float32"] == expected
    assert info["rule"]["float64"] == "aten"


@pytest.mark.skipif("brgemm" not in convt_ext.engine_info()["available"], reason="no oneDNN ukernel in this torch")
def test_auto_runs_the_ukernel_where_it_takes_the_operands():
    """Under "auto" where the rule picks the ukernel (a non-Intel CPU with AVX-512), or
    with it forced elsewhere (an Intel CPU, or AVX2), so that both branches of the rule
    run on every CPU: conv's forward GEMMs (row-major operands) run on it, tiny and large
    alike, and never on oneDNN's matmul; a GEMM with a transposed operand (the weight
    gradient's) runs on aten. All torch's values."""
    convt_ext.set_gemm_engine("auto" if convt_ext.engine_info()["rule"]["float32"] == "brgemm" else "brgemm")
    gen = torch.Generator().manual_seed(7)
    for xs, ws in [((1, 1, 4, 4), (1, 1, 3, 3)), ((2, 64, 24, 24), (64, 64, 3, 3)), ((2, 32, 10, 10), (96, 32, 1, 1))]:
        x, w = torch.randn(xs, generator=gen), torch.randn(ws, generator=gen)
        before = _calls()
        got = convt_ext.conv2d(x, w, None, 1, 1)
        ran = {e: n - before[e] for e, n in _calls().items() if n > before[e]}
        assert list(ran) == ["brgemm"], (xs, ws, ran)
        torch.testing.assert_close(got.double(), F.conv2d(x.double(), w.double(), None, 1, 1), rtol=1e-4, atol=1e-4)
        dy = torch.randn(got.shape, generator=gen)
        before = _calls()
        grad_w = convt_ext.conv2d_weight(x, w.shape, dy, 1, 1)
        ran = {e: n - before[e] for e, n in _calls().items() if n > before[e]}
        assert "onednn" not in ran and "aten" in ran, (xs, ws, ran)
        want = torch.nn.grad.conv2d_weight(x.double(), w.shape, dy.double(), 1, 1)
        torch.testing.assert_close(grad_w.double(), want, rtol=1e-4, atol=1e-4)


def test_settings_and_errors():
    for name in ("auto", "benchmark", "aten", "onednn", "brgemm"):
        convt_ext.set_gemm_engine(name)
        assert convt_ext.gemm_engine() == name
        assert convt_ext.engine_info()["setting"] == name
        assert convt_ext.build_info()["gemm_engine"] == name
    with pytest.raises(ValueError, match="engine must be one of"):
        convt_ext.set_gemm_engine("mkl")
    with pytest.raises(TypeError, match="engine must be a str"):
        convt_ext.set_gemm_engine(1)
    assert convt_ext.gemm_engine() == "brgemm"  # unchanged by the refused calls


def _python(code, **env):
    return subprocess.run(
        # -P: the installed package, not the checkout's source folder (no _C).
        [sys.executable, "-P", "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_environment_variable():
    done = _python("import convt_ext; print(convt_ext.gemm_engine())", CONVT_EXT_GEMM_ENGINE="brgemm")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "brgemm"
    bad = _python("import convt_ext", CONVT_EXT_GEMM_ENGINE="fastest")
    assert bad.returncode != 0 and "CONVT_EXT_GEMM_ENGINE must be one of" in bad.stderr


# ---------------------------------------------------------------- conv_transpose's backward


class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "d,n,ci,co,g,size,k,s,p,op,dl",
    [
        (2, 3, 6, 4, 1, 5, 3, 2, 1, 1, 1),  # wide path
        (2, 2, 4, 6, 2, 30, 4, 2, 1, 0, 1),  # blocks
        (2, 2, 8, 4, 2, 6, 1, 1, 0, 0, 1),  # 1x1: dy is its own columns
        (1, 2, 4, 3, 1, 40, 3, 3, 1, 2, 1),
        (3, 2, 4, 2, 2, 4, 2, 2, 0, 1, 1),
        (2, 2, 4, 4, 1, 5, 3, 1, 1, 0, 2),  # dilation
    ],
)
def test_conv_transpose_backward_shares_columns(d, n, ci, co, g, size, k, s, p, op, dl):
    gen = torch.Generator().manual_seed(size + k)
    x = torch.randn(n, ci, *([size] * d), dtype=torch.float64, generator=gen)
    w = torch.randn(ci, co // g, *([k] * d), dtype=torch.float64, generator=gen)
    convt = getattr(convt_ext, f"conv_transpose{d}d")
    tconvt = getattr(F, f"conv_transpose{d}d")
    args = dict(stride=s, padding=p, output_padding=op, groups=g, dilation=dl)
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = convt(xa, wa, **args)
    dy = torch.randn(y.shape, dtype=torch.float64, generator=gen)
    with _OpLog() as log:
        gx, gw = torch.autograd.grad(y, (xa, wa), dy)
    assert "convt_ext._conv_transpose_backward.default" in log.names
    assert not any("conv2d_weight" in name or f"conv{d}d_weight" in name for name in log.names)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    rx, rw = torch.autograd.grad(tconvt(xr, wr, **args), (xr, wr), dy)
    torch.testing.assert_close(gx, rx, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(gw, rw, atol=1e-10, rtol=1e-10)


def test_conv_transpose_backward_keeps_double_backward():
    """With create_graph the two differentiable ops run instead, so the
    second derivative is still there."""
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    with _OpLog() as log:
        torch.autograd.gradgradcheck(
            lambda a, b: convt_ext.conv_transpose2d(a, b, stride=2, padding=1), (x, w)
        )
    assert "convt_ext._conv_transpose_backward.default" not in log.names


def test_conv_transpose_backward_op():
    x = torch.randn(2, 6, 5, 5)
    w = torch.randn(6, 4, 3, 3)
    dy = torch.randn(2, 4, 9, 9)
    gx, gw = torch.ops.convt_ext._conv_transpose_backward(dy, x, w, [2, 2], [1, 1], [0, 0], 1, [1, 1])
    torch.testing.assert_close(gx, F.conv2d(dy.double(), w.double(), stride=2, padding=1).float(), atol=1e-4, rtol=1e-4)
    ref_w = torch.nn.grad.conv2d_weight(dy.double(), w.shape, x.double(), stride=2, padding=1)
    torch.testing.assert_close(gw, ref_w.float(), atol=1e-3, rtol=1e-4)
    with pytest.raises(ValueError, match="grad_output must have the output's shape"):
        torch.ops.convt_ext._conv_transpose_backward(dy[:, :, :8], x, w, [2, 2], [1, 1], [0, 0], 1, [1, 1])
    # The forward op's argument rules, the same code.
    with pytest.raises(ValueError, match="output_padding must be smaller than either stride or dilation"):
        torch.ops.convt_ext._conv_transpose_backward(dy, x, w, [2, 2], [1, 1], [2, 2], 1, [1, 1])
    with pytest.raises(ValueError, match="must be divisible by groups=4"):
        torch.ops.convt_ext._conv_transpose_backward(dy, x, w, [2, 2], [1, 1], [0, 0], 4, [1, 1])
    torch.library.opcheck(
        torch.ops.convt_ext._conv_transpose_backward.default,
        (dy, x, w, [2, 2], [1, 1], [0, 0], 1, [1, 1]),
        test_utils=("test_schema", "test_faketensor"),
    )
    # Empty batch and zero output channels.
    gx, gw = torch.ops.convt_ext._conv_transpose_backward(dy[:0], x[:0], w, [2, 2], [1, 1], [0, 0], 1, [1, 1])
    assert gx.shape == (0, 6, 5, 5) and torch.equal(gw, torch.zeros_like(w))
    gx, gw = torch.ops.convt_ext._conv_transpose_backward(dy[:, :0], x, w[:, :0], [2, 2], [1, 1], [0, 0], 1, [1, 1])
    assert torch.equal(gx, torch.zeros_like(x)) and gw.shape == (6, 0, 3, 3)


def test_conv_transpose_backward_under_compile():
    x = torch.randn(2, 6, 5, 5, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, requires_grad=True)

    def f(a, b):
        return convt_ext.conv_transpose2d(a, b, stride=2, padding=1).square().sum()

    got = torch.autograd.grad(torch.compile(f, backend="aot_eager", fullgraph=True)(x, w), (x, w))
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    want = torch.autograd.grad(F.conv_transpose2d(xr, wr, stride=2, padding=1).square().sum(), (xr, wr))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e.float(), atol=1e-3, rtol=1e-4)


# ---------------------------------------------------------------- TF32 on CUDA


@pytest.mark.cuda
@requires_cuda
def test_cuda_float32_follows_the_convolution_tf32_flag(tf32_setting):
    """Note [TF32 as a convolution]: float32 GEMMs follow the convolution flag, as F.conv2d
    does, under each combination with the matmul flag (conftest.TF32_SETTINGS, set through both
    of torch's APIs): TF32 where it is allowed (on a shape where cuBLAS always takes it), within
    IEEE float32's allowance where it is not (Note [TF32 tolerance]); no flag changes."""
    conv_tf32, _ = tf32_setting
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, 24, 24, generator=gen)
    w = torch.randn(64, 64, 3, 3, generator=gen)
    ops = {
        "conv": (lambda a, b: convt_ext.conv2d(a, b, padding=1), lambda a, b: F.conv2d(a, b, padding=1), w),
        "conv_transpose": (lambda a, b: convt_ext.conv_transpose2d(a, b, padding=1),
                           lambda a, b: F.conv_transpose2d(a, b, padding=1), w),
        "weight": (lambda a, b: convt_ext.conv2d_weight(a, w.shape, b, padding=1),
                   lambda a, b: torch.nn.grad.conv2d_weight(a, w.shape, b, padding=1), x),
    }
    flags = tf32_state()
    errors = {}
    for name, (ours, theirs, second) in ops.items():
        got = ours(x.cuda(), second.cuda())
        a, b = x.double(), second.double()
        ref, sq, n = theirs(a, b), theirs(a * a, b * b), theirs(torch.ones_like(a), torch.ones_like(b))
        check_within(got, ref, sq, n, conv_tf32, name)
        errors[name] = relative_error(got, ref, sq)
        assert tf32_state() == flags
    if conv_tf32 and torch.cuda.get_device_capability() >= (8, 0):  # TF32 exists from Ampere on
        assert all(tf32_was_used([e]) for e in errors.values()), errors
