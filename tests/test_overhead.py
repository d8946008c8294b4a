"""Host work per call (python -m convt_ext.bench --overhead measures it): one
memory-format decision per call with no allocation, the Python autograd layer
only where a graph is being built, and gradients put in the forward's format
without a fresh tensor where their strides already are torch's."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import convt_ext
import convt_ext._autograd as autograd_layer

ops = torch.ops.convt_ext


def allocations(fn):
    """The sizes in bytes of the CPU allocations fn() makes, by torch.profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.nbytes() > 0]


@pytest.fixture
def counting(monkeypatch):
    """Counts calls of names in convt_ext._autograd: counting("name") -> its counter list."""

    def count(name):
        calls = []
        original = getattr(autograd_layer, name)

        def wrapper(*args, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)

        monkeypatch.setattr(autograd_layer, name, wrapper)
        return calls

    return count


def test_strides_are_torchs():
    """The strides _in_format compares with are those torch gives a new tensor, for every
    format, with empty and size-1 dimensions."""
    for shape in itertools.product((0, 1, 2, 3), repeat=4):
        for fmt in (torch.contiguous_format, torch.channels_last):
            assert autograd_layer._strides(shape, fmt) == torch.empty(shape, memory_format=fmt).stride(), (shape, fmt)
    for shape in itertools.product((0, 1, 3), repeat=5):
        for fmt in (torch.contiguous_format, torch.channels_last_3d):
            assert autograd_layer._strides(shape, fmt) == torch.empty(shape, memory_format=fmt).stride(), (shape, fmt)


def test_no_graph_skips_the_python_autograd_kernel(counting):
    """Without a graph to build, convt_ext.functional reaches the op below autograd: the
    Python Autograd kernel (which asks needs_graph) does not run. With one, it does."""
    kernel_checks = counting("needs_graph")
    x, w = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3)
    convt_ext.functional.conv2d(x, w)
    convt_ext.functional.conv_transpose2d(torch.randn(2, 4, 4, 4), w)
    with torch.no_grad():
        convt_ext.functional.conv2d(x, w.requires_grad_())
    assert kernel_checks == []
    y = convt_ext.functional.conv2d(x, w)
    assert len(kernel_checks) == 1 and y.requires_grad


@pytest.mark.parametrize("channels_last", [False, True])
def test_one_format_decision_per_call(counting, channels_last):
    """Building a graph, the autograd layer reads the output's format from its strides
    instead of asking torch again; the gradients still get torch's formats and values."""
    asked = counting("conv_format")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64).requires_grad_()
    y = convt_ext.functional.conv2d(x, w, padding=1)
    y.backward(torch.ones_like(y))
    assert asked == []
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    yr = F.conv2d(xr, wr, padding=1)
    yr.backward(torch.ones_like(yr))
    assert y.stride() == yr.stride()
    for ours, theirs in ((x.grad, xr.grad), (w.grad, wr.grad)):
        torch.testing.assert_close(ours, theirs)
        assert ours.stride() == theirs.stride()


def test_ambiguous_output_strides_ask_torch(counting):
    """An output of one channel and one pixel has the same strides in both formats: then,
    and only then, the layer asks torch, and the input gradient gets torch's format."""
    asked = counting("conv_format")
    x = torch.randn(2, 3, 3, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(1, 3, 3, 3, dtype=torch.float64).requires_grad_()
    y = convt_ext.functional.conv2d(x, w)
    y.sum().backward()
    assert len(asked) == 1
    xr = x.detach().clone().requires_grad_()
    F.conv2d(xr, w.detach()).sum().backward()
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
    rows = [line for line in out.splitlines() if line.startswith(("conv2d", "conv_transpose2d"))]
    assert len(rows) == len(overhead.cases()) == 6
    for line in rows:
        ours, theirs, ratio = (float(v) for v in line.split()[-3:])
        assert ours > 0 and theirs > 0 and ratio == pytest.approx(ours / theirs, rel=0.05, abs=0.02)
