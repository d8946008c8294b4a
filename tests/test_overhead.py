"""Host work per call (python -m convt_ext.bench --overhead measures it), tested by
structure, never by time: a graph of C++ nodes whose backward runs no Python, one
memory-format decision per op call, a bounded number of ATen calls per call, and
gradients put in the forward's format without a fresh tensor where their strides
already are torch's."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import convt_ext
import convt_ext._autograd as autograd_layer  # noqa: F401  (_strides)

ops = torch.ops.convt_ext


def allocations(fn):
    """The sizes in bytes of the CPU allocations fn() makes, by torch.profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.nbytes() > 0]


def aten_calls(fn):
    """The names of the dispatcher ops fn() calls, nested calls included, by torch.profiler:
    a count of the ATen work a call does on the host, which no timing noise can move."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events()]


def python_calls(fn, package="convt_ext"):
    """The Python functions of `package` that run while fn() runs (sys.setprofile)."""
    import sys

    seen = []

    def tracer(frame, event, arg):
        if event == "call" and f"{package}/" in frame.f_code.co_filename:
            seen.append(frame.f_code.co_name)

    sys.setprofile(tracer)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return seen


def graph_nodes(t):
    """The class names of the autograd nodes that produced t, transitively."""
    names, stack, seen = [], [t.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return names


def conv_calls(d=2):
    """One call of each differentiable op on tiny float64 tensors that require grad."""
    f = convt_ext.functional
    x = torch.randn(2, 2, *[5] * d, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 2, *[3] * d, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    conv, conv_t, weight = ((f.conv1d, f.conv_transpose1d, f.conv1d_weight), (f.conv2d, f.conv_transpose2d, f.conv2d_weight),
                            (f.conv3d, f.conv_transpose3d, f.conv3d_weight))[d - 1]
    dy = torch.randn(2, 2, *[3] * d, dtype=torch.float64, requires_grad=True)
    return {
        "conv": lambda: conv(x, w, b, stride=1, padding=0),
        "conv_transpose": lambda: conv_t(x, w, b, stride=2, padding=1, output_padding=1),
        "conv_weight": lambda: weight(x, w.shape, dy),
        "im2col": lambda: convt_ext.im2col(x, 3) if d == 2 else conv(x, w),
        "col2im": lambda: convt_ext.col2im(torch.randn(2, 18, 9, dtype=torch.float64, requires_grad=True), (5, 5), 3)
        if d == 2 else conv(x, w),
    }


@pytest.mark.parametrize("d", [1, 2, 3])
def test_a_graph_is_cpp_nodes_and_backward_never_enters_python(d):
    """Building a graph, each op records one C++ node (torch::autograd::Function's
    CppFunction), not a Python autograd.Function's; its backward, which calls the partner
    ops, runs no Python function of convt_ext at all. The gradients are torch's."""
    for name, call in conv_calls(d).items():
        y = call()
        nodes = graph_nodes(y)
        assert nodes and set(nodes) <= {"CppFunction", "AccumulateGrad"}, (name, nodes)
        grad = torch.randn_like(y)
        assert python_calls(lambda: y.backward(grad)) == [], name


def test_graph_values_match_torch():
    """The C++ nodes' gradients, double backward included, are torch's in float64."""
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    for ours, theirs, kw in (
        (convt_ext.functional.conv2d, F.conv2d, dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2))),
        (convt_ext.functional.conv_transpose2d, F.conv_transpose2d, dict(stride=2, padding=1, output_padding=1)),
    ):
        wt = w if ours is convt_ext.functional.conv2d else w.transpose(0, 1).detach().clone().requires_grad_()
        xt = x if ours is convt_ext.functional.conv2d else torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
        y, yr = ours(xt, wt, b, **kw), theirs(xt, wt, b, **kw)
        torch.testing.assert_close(y, yr)
        g = torch.randn_like(y)
        grads = torch.autograd.grad(y, (xt, wt, b), g, create_graph=True)
        grads_r = torch.autograd.grad(yr, (xt, wt, b), g, create_graph=True)
        for a, r in zip(grads, grads_r):
            torch.testing.assert_close(a, r)
        # Double backward: through the same C++ kernels.
        h = [torch.randn_like(a) for a in grads[:2]]
        second = torch.autograd.grad(grads[:2], (xt, wt), h)
        second_r = torch.autograd.grad(grads_r[:2], (xt, wt), h)
        for a, r in zip(second, second_r):
            torch.testing.assert_close(a, r)


def test_python_keeps_forward_ad_and_torch_func():
    """Forward-mode AD and torch.func transforms take the Python autograd.Functions
    (Note [Autograd in C++, and where Python keeps it]); their values are torch's."""
    import torch.autograd.forward_ad as fwAD

    x, w = torch.randn(2, 3, 6, 6, dtype=torch.float64), torch.randn(4, 3, 3, 3, dtype=torch.float64)
    tx = torch.randn_like(x)
    with fwAD.dual_level():
        y = convt_ext.functional.conv2d(fwAD.make_dual(x, tx), w)
        assert type(y.grad_fn).__name__ != "CppFunction"
        torch.testing.assert_close(fwAD.unpack_dual(y).tangent, F.conv2d(tx, w))
    _, jvp = torch.func.jvp(lambda t: convt_ext.functional.conv2d(t, w), (x,), (tx,))
    torch.testing.assert_close(jvp, F.conv2d(tx, w))
    g = torch.func.grad(lambda t: convt_ext.functional.conv2d(t, w).square().sum())(x)
    torch.testing.assert_close(g, torch.func.grad(lambda t: F.conv2d(t, w).square().sum())(x))


def format_asks(fn):
    """How often fn() asks torch for a convolution's memory format: each ask runs torch's
    backend choice, which calls aten::_nnpack_available (for a direct convolution)."""
    return aten_calls(fn).count("aten::_nnpack_available")


def ops_alone(x, w, dy, padding):
    """The three ops of a conv2d forward+backward, called below autograd."""
    with torch.no_grad():
        ops.conv2d(x, w, None, [1, 1], [padding] * 2, [1, 1], 1)
        ops.conv_transpose2d(dy, w, None, [1, 1], [padding] * 2, [0, 0], 1, [1, 1])
        ops.conv2d_weight(x, dy, list(w.shape), [1, 1], [padding] * 2, [1, 1], 1)


@pytest.mark.parametrize("channels_last", [False, True])
def test_one_format_decision_per_op_call(channels_last):
    """Building a graph, the autograd layer reads the forward's format from the output's
    strides instead of asking torch again: a forward+backward asks as often as its three
    ops do alone. The gradients still get torch's formats and values."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64).requires_grad_()
    dy = torch.ones(2, 4, 6, 5, dtype=torch.float64).contiguous(memory_format=fmt)

    def step():
        convt_ext.functional.conv2d(x, w, padding=1).backward(dy)

    alone = format_asks(lambda: ops_alone(x, w, dy, 1))
    assert alone >= 1
    assert format_asks(step) == alone
    grads = (x.grad.clone(), w.grad.clone())
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    F.conv2d(xr, wr, padding=1).backward(dy)
    for a, r in zip(grads, (xr.grad, wr.grad)):
        torch.testing.assert_close(a, r)
        assert a.stride() == r.stride()


def test_ambiguous_output_strides_ask_torch():
    """An output of one channel and one pixel has the same strides in both formats: then,
    and only then, the autograd layer asks torch once more, and the input gradient gets
    torch's format."""
    x = torch.randn(2, 3, 3, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(1, 3, 3, 3, dtype=torch.float64).requires_grad_()
    dy = torch.ones(2, 1, 1, 1, dtype=torch.float64)

    def step():
        convt_ext.functional.conv2d(x, w).backward(dy)

    assert format_asks(step) == format_asks(lambda: ops_alone(x, w, dy, 0)) + 1
    xr = x.detach().clone().requires_grad_()
    F.conv2d(xr, w.detach()).backward(dy)
    assert x.grad.stride() == xr.grad.stride()
    torch.testing.assert_close(x.grad, xr.grad)


@pytest.mark.parametrize("engine", convt_ext.engine_info()["available"])
def test_weight_gradient_format_allocates_no_weight(engine):
    """The weight gradient asks torch for its memory format with a meta weight: under a
    GPU's plan (one range, which sums into the result), its only weight-sized allocation
    is the gradient itself, on the engines that write into it (aten, the ukernel).
    oneDNN's matmul returns a new tensor, which the engine adds into the result: one
    weight-sized allocation more, and no other. The engine is pinned: which one "auto"
    picks depends on the CPU (oneDNN for float32 on an AVX-512 AMD, aten elsewhere)."""
    from emulated_ops import emulated

    x, dy = torch.randn(2, 5, 9, 8), torch.randn(2, 7, 7, 6)
    weight_size = [7, 5, 3, 3]
    call = lambda: emulated().conv_weight_gpu_plan(x, dy, weight_size, [1, 1], [0, 0], [1, 1], 1)  # noqa: E731
    old = convt_ext.gemm_engine()
    convt_ext.set_gemm_engine(engine)
    try:
        call()
        before = convt_ext.engine_info()["calls"]
        sizes = allocations(call)
        ran = {e: n - before[e] for e, n in convt_ext.engine_info()["calls"].items() if n > before[e]}
        result = call()
    finally:
        convt_ext.set_gemm_engine(old)
    # The ukernel takes no transposed operand (this GEMM's columns are): aten runs it.
    assert list(ran) == (["aten"] if engine == "brgemm" else [engine]), ran
    assert sizes.count(7 * 5 * 3 * 3 * 4) == (2 if engine == "onednn" else 1), sizes
    torch.testing.assert_close(result, torch.nn.grad.conv2d_weight(x, weight_size, dy))


def test_overhead_bench_mode(capsys, monkeypatch):
    """python -m convt_ext.bench --overhead: every case timed on both sides and printed,
    on one thread unless told otherwise (shortened here)."""
    from convt_ext.bench import __main__ as cli
    from convt_ext.bench import overhead

    threads = torch.get_num_threads()
    monkeypatch.setattr(overhead, "CALLS", 3)
    monkeypatch.setattr(overhead, "REPEATS", 1)
    try:
        assert cli.main(["--overhead"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("conv", "im2col", "col2im"))]
    labels = [label for label, _, _ in overhead.cases()]
    assert len(rows) == len(labels) == 24
    for name in ("conv1d", "conv3d", "conv_transpose3d", "im2col", "col2im", "64ch"):
        assert any(name in label for label in labels), name
    for line in rows:
        ours, theirs, ratio, target = (float(v) for v in line.split()[-5:-1])
        assert ours > 0 and theirs > 0 and ratio == pytest.approx(ours / theirs, rel=0.05, abs=0.02)
        assert line.split()[-1] == ("yes" if ours <= target else "no")
    assert out.splitlines()[-1].endswith(f"of {len(labels)} rows within target")


def test_gpu_plan_overhead_script(capsys):
    """benchmarks/gpu_plan_overhead.py times the GPU plan's ops (shortened here): every
    row printed, with its goal, and the engine and threads restored."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu_plan_overhead.py")
    spec = importlib.util.spec_from_file_location("gpu_plan_overhead", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    engine, threads = convt_ext.gemm_engine(), torch.get_num_threads()
    assert script.main(calls=3, repeats=1) == 0
    assert (convt_ext.gemm_engine(), torch.get_num_threads()) == (engine, threads)
    rows = [line for line in capsys.readouterr().out.splitlines() if "GPU plan" in line and line.startswith("conv")]
    assert len(rows) == 4
    for line in rows:
        us, goal = (float(v) for v in line.split()[-3:-1])
        assert us > 0 and goal in (15.0, 40.0)


def test_gpu_plan_step_makes_no_host_sync():
    """A forward+backward with the GPU's plan makes no call that would synchronise a GPU
    or break a CUDA graph's capture: no scalar read back (aten::item,
    aten::_local_scalar_dense), no copy to another device, no nonzero. On a GPU,
    tests/test_cuda_device.py captures the same step in a CUDA graph."""
    from emulated_ops import emulated

    e = emulated()
    x, w, g = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3), torch.randn(2, 4, 4, 4)

    def step():
        e.conv_gpu_plan(x, w, None, [1, 1], [0, 0], [1, 1], 1)
        e.conv_transpose_gpu_plan(g, w, None, [1, 1], [0, 0], [0, 0], 1, [1, 1])
        e.conv_weight_gpu_plan(x, g, list(w.shape), [1, 1], [0, 0], [1, 1], 1)
        e.conv_transpose_backward_gpu_plan(x, g, w, [1, 1], [0, 0], [0, 0], 1, [1, 1])

    step()
    names = aten_calls(step)
    for op in ("conv_gpu_plan", "conv_transpose_gpu_plan", "conv_weight_gpu_plan", "conv_transpose_backward_gpu_plan"):
        assert f"convt_ext_emulated::{op}" in names, names
    assert "aten::empty" in names  # the profiler saw the ATen calls inside
    for banned in ("aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::_to_copy", "aten::to"):
        assert banned not in names, (banned, names)


# The most ATen calls (profiler events, nested calls included) that one below-autograd call of
# a tiny layer (2 samples, 6x6 pixels) may make, by path: measured, with some room. A call
# made before the per-call work was cut made up to 1,626 (conv_transpose2d on the column
# path: its plan split a 6x6 output into 18 blocks of views and GEMMs).
ATEN_CALLS_AT_MOST = {"columns": 64, "view": 56, "depthwise": 24}


@pytest.fixture
def restore_conv_path():
    old, engine = convt_ext.conv_path(), convt_ext.gemm_engine()
    yield
    convt_ext.set_conv_path(old)
    convt_ext.set_gemm_engine(engine)


@pytest.mark.parametrize("path", sorted(ATEN_CALLS_AT_MOST))
@pytest.mark.parametrize("channels,groups", [(1, 1), (4, 4), (16, 1)])
def test_a_tiny_call_makes_few_aten_calls(path, channels, groups, restore_conv_path):
    """Structural, so it cannot flake: each op of a tiny layer makes at most
    ATEN_CALLS_AT_MOST[path] ATen calls, on the path forced, and runs on that path. The GEMM
    engine is pinned to aten (MKL): oneDNN's matmul, when forced, adds its own calls per
    GEMM (a boxed op, contiguous copies), which the engine rule keeps it from."""
    x, w = torch.randn(2, channels, 6, 6), torch.randn(channels, channels // groups, 3, 3)
    g = torch.randn(2, channels, 4, 4)
    one, zero = [1, 1], [0, 0]
    convt_ext.set_conv_path(path)
    convt_ext.set_gemm_engine("aten")
    calls = {
        "conv2d": lambda: ops.conv2d(x, w, None, one, zero, one, groups),
        "conv_transpose2d": lambda: ops.conv_transpose2d(g, w, None, one, zero, zero, groups, one),
        "conv2d_weight": lambda: ops.conv2d_weight(x, g, list(w.shape), one, zero, one, groups),
    }
    for name, call in calls.items():
        before = convt_ext.engine_info()["path"]["calls"][path]
        expected = call()
        assert convt_ext.engine_info()["path"]["calls"][path] == before + 1, (path, name)
        names = aten_calls(call)
        assert len(names) <= ATEN_CALLS_AT_MOST[path], (path, name, len(names), names)
        torch.testing.assert_close(call(), expected)


# Note [The fast entry] in csrc/calls.cpp: the Python functions' argument checks, skipped
# where they would pass the call unchanged.
CHECKS = {"_ntuple", "_batched", "_int", "_check_tensor", "_check_bias", "call"}


def fast_cases(d):
    """(our function, torch's, args, kwargs) with plain arguments in every accepted spelling:
    ints, tuples, lists, a Parameter weight, a bias, float64."""
    f = convt_ext.functional
    x = torch.randn(2, 4, *[6] * d, dtype=torch.float64)
    w = torch.nn.Parameter(torch.randn(4, 2, *[3] * d, dtype=torch.float64))
    b = torch.randn(4, dtype=torch.float64)
    conv, conv_t = getattr(f, f"conv{d}d"), getattr(f, f"conv_transpose{d}d")
    tconv, tconv_t = getattr(F, f"conv{d}d"), getattr(F, f"conv_transpose{d}d")
    return [
        (conv, tconv, (x, w, b), dict(stride=2, padding=(1,) * d, dilation=[1] * d, groups=2)),
        (conv, tconv, (x, w, None, 1, 0, 1, 2), {}),
        (conv_t, tconv_t, (x, w.transpose(0, 1).reshape(4, 2, *[3] * d), b),
         dict(stride=(2,) * d, padding=1, output_padding=[1] * d, groups=2, dilation=1)),
    ]


@pytest.mark.parametrize("d", [1, 2, 3])
def test_the_fast_entry_takes_plain_calls(d):
    """A call with plain arguments skips every Python check (no _ntuple, _batched, ...
    runs) and still gives torch's values, with and without a graph."""
    for ours, theirs, args, kwargs in fast_cases(d):
        ran = python_calls(lambda: ours(*args, **kwargs))
        assert not CHECKS & set(ran), (ours.__name__, ran)
        torch.testing.assert_close(ours(*args, **kwargs), theirs(*args, **kwargs))
        leaf = args[0].detach().requires_grad_()
        y, yr = ours(leaf, *args[1:], **kwargs), theirs(leaf, *args[1:], **kwargs)
        torch.testing.assert_close(torch.autograd.grad(y.sum(), leaf)[0], torch.autograd.grad(yr.sum(), leaf)[0])


class Marked(torch.Tensor):
    """A Tensor subclass: its __torch_function__ must run."""


class Mode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_the_fast_entry_refuses_what_python_must_check():
    """_C._fast_conv / _fast_conv_transpose return None (so Python checks, with its
    errors naming the argument) for every spelling the Python side has a rule for, and
    under a __torch_function__ mode or a torch.func transform; the public functions then
    give torch's values or its error."""
    from convt_ext import _C

    x, w = torch.randn(1, 2, 5, 5, dtype=torch.float64), torch.randn(2, 2, 3, 3, dtype=torch.float64)
    plain = dict(input=x, weight=w, bias=None, stride=1, padding=0, dilation=1, groups=1)
    order = ["input", "weight", "bias", "stride", "padding", "dilation", "groups"]
    fast = lambda **kw: _C._fast_conv(2, *[{**plain, **kw}[k] for k in order])  # noqa: E731
    assert fast() is not None
    refused = dict(
        stride=[True, (1,), (1, 1, 1), 1.0, 2**63, (1, 2**64), "1"],
        padding=["same", "valid", (torch.tensor(1), 0)],
        dilation=[(1, True)],
        groups=[True, 1.0, torch.tensor(1), 2**70],
        input=[x[0], x.as_subclass(Marked), x.numpy()],
        weight=[w.as_subclass(Marked), None],
        bias=[torch.zeros(2, dtype=torch.float64).as_subclass(Marked), 0.0],
    )
    for name, values in refused.items():
        for value in values:
            assert fast(**{name: value}) is None, (name, value)
    with Mode():
        assert fast() is None
    torch.func.vmap(lambda t: _assert_none(fast(input=t[None])))(x)
    t_args = [x, w, None, 1, 0, 0, 1, 1]
    assert _C._fast_conv_transpose(2, *t_args) is not None
    for i, value in ((3, True), (5, (0,)), (6, False), (0, x[0])):
        assert _C._fast_conv_transpose(2, *t_args[:i], value, *t_args[i + 1:]) is None, (i, value)
    # The public functions on refused spellings: torch's values, or an error naming the argument.
    f = convt_ext.functional
    torch.testing.assert_close(f.conv2d(x[0], w, padding="same"), F.conv2d(x[0], w, padding="same"))
    with pytest.raises(TypeError, match="stride"):
        f.conv2d(x, w, stride=True)
    with pytest.raises(ValueError, match="groups"):
        f.conv_transpose2d(x, w, groups=2**70)


def _assert_none(value):
    assert value is None
    return torch.zeros(())
