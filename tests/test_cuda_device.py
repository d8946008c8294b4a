"""CUDA behaviour on a table of cases with data (CASES): float32 parity of every op and gradient
under each TF32 setting (Note [TF32 settings in the tests] in conftest.py), a side stream, CUDA
graph capture and replay, torch.use_deterministic_algorithms, tensors past 2^31 elements, and a
second device. Every case has a batch of at least 1 and covers one of the planner's paths (the
wide GEMM over several samples, blocks within a sample, the pixel rows of a channels_last 1x1
layer, the pointwise 1x1 layer), groups, channels_last and 1-/3-d.

Expected values come from torch.nn.functional in float64 on the CPU, with the per-element
allowance of Note [TF32 tolerance] (tests/tf32_bounds.py). The CUDA tests are marked `cuda`
(`pytest -m cuda`); the CPU tests here check the table itself and the allowance.
"""
import contextlib
import functools
import math
import zlib

import pytest
import torch
import torch.nn.functional as F

import convt_ext
from conftest import requires_cuda, set_tf32
from tf32_bounds import allowed_error, check_within, reference, relative_error, round_to_tf32, tf32_was_used


def cuda_test(fn):
    return pytest.mark.cuda(requires_cuda(fn))


def _case(name, dims, transposed, batch, cin, cout, size, kernel, path, stride=1, padding=0,
          dilation=1, output_padding=0, groups=1, bias=True, channels_last=False, workspace=None):
    def tup(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v,) * dims
    return dict(name=name, dims=dims, transposed=transposed, batch=batch, cin=cin, cout=cout,
                size=tup(size), kernel=tup(kernel), stride=tup(stride), padding=tup(padding),
                dilation=tup(dilation), output_padding=tup(output_padding), groups=groups, bias=bias,
                channels_last=channels_last, workspace=workspace, path=path)


# path: "wide"       one GEMM over the columns of several samples (batch >= 2);
#       "blocks"     the workspace limit (bytes) splits each sample's columns into blocks;
#       "pixel_rows" a channels_last 1x1 layer, whose pixels' rows are the GEMM operands;
#       "pointwise"  a contiguous 1x1 layer (stride 1, no padding): no im2col/col2im;
#       "depthwise"  one channel per group: the depthwise path's kernels (conv/depthwise.h).
CASES = [
    _case("conv2d-wide", 2, False, 4, 6, 8, (9, 7), 3, "wide", padding=1),
    _case("conv2d-blocks-batch1", 2, False, 1, 4, 5, (12, 10), (3, 2), "blocks", stride=(2, 1),
          padding=(1, 0), dilation=(1, 2), bias=False, workspace=1024),
    _case("conv2d-blocks-batch3", 2, False, 3, 5, 4, (11, 9), 3, "blocks", padding=1, workspace=2048),
    _case("conv2d-groups3-dilated", 2, False, 2, 6, 9, (8, 11), 3, "wide", stride=(2, 1), padding=2,
          dilation=2, groups=3),
    _case("conv2d-1x1", 2, False, 3, 8, 4, (5, 6), 1, "pointwise"),
    _case("conv2d-1x1-channels_last", 2, False, 3, 8, 4, (5, 6), 1, "pixel_rows", channels_last=True),
    _case("conv2d-1x1-channels_last-groups2", 2, False, 2, 8, 6, (4, 7), 1, "pixel_rows", groups=2,
          bias=False, channels_last=True),
    _case("conv2d-3x3-channels_last", 2, False, 2, 5, 7, (6, 9), 3, "wide", padding=1, channels_last=True),
    _case("conv1d", 1, False, 3, 4, 6, 17, 4, "wide", stride=2, padding=1),
    _case("conv3d-groups2", 3, False, 2, 4, 6, (5, 6, 4), (2, 3, 2), "wide", stride=(1, 2, 1),
          padding=(1, 1, 0), groups=2),
    _case("conv3d-channels_last", 3, False, 2, 3, 4, (4, 5, 6), 3, "wide", padding=1, bias=False,
          channels_last=True),
    _case("conv_transpose2d-wide", 2, True, 4, 6, 4, (5, 6), 3, "wide", stride=2, padding=1,
          output_padding=1),
    _case("conv_transpose2d-blocks", 2, True, 2, 4, 3, (6, 5), (3, 4), "blocks", stride=(2, 1),
          padding=(1, 2), output_padding=(1, 0), workspace=1024),
    _case("conv_transpose2d-groups2-dilated", 2, True, 2, 6, 4, (5, 5), 3, "wide", dilation=2,
          output_padding=(1, 0), groups=2, bias=False),
    _case("conv_transpose2d-1x1", 2, True, 3, 8, 5, (4, 6), 1, "pointwise"),
    _case("conv_transpose2d-1x1-channels_last-groups2", 2, True, 3, 8, 6, (5, 4), 1, "pixel_rows",
          groups=2, channels_last=True),
    _case("conv_transpose1d", 1, True, 3, 4, 3, 9, 3, "wide", stride=3, padding=1, output_padding=2),
    _case("conv2d-depthwise-channels_last", 2, False, 2, 8, 16, (9, 8), 3, "depthwise", stride=2,
          padding=1, groups=8, channels_last=True),
    _case("conv1d-depthwise", 1, False, 3, 6, 6, 20, 5, "depthwise", padding=2, groups=6),
    _case("conv_transpose3d-depthwise", 3, True, 2, 4, 8, (3, 4, 3), 3, "depthwise", stride=2,
          padding=1, output_padding=1, groups=4),
    _case("conv_transpose3d", 3, True, 2, 4, 2, (3, 4, 3), (2, 3, 2), "wide", stride=(2, 1, 2),
          padding=(0, 1, 1), output_padding=(1, 0, 1)),
]
IDS = [c["name"] for c in CASES]


def _kwargs(case):
    kw = dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"], groups=case["groups"])
    if case["transposed"]:
        kw["output_padding"] = case["output_padding"]
    return kw


def _weight_shape(case):
    g = case["groups"]
    if case["transposed"]:
        return (case["cin"], case["cout"] // g) + case["kernel"]
    return (case["cout"], case["cin"] // g) + case["kernel"]


def _functions(case):
    """(convt_ext's op, torch's op, convt_ext's weight-gradient op), each f(x, w, b)."""
    d, kw = case["dims"], _kwargs(case)
    name = f"conv_transpose{d}d" if case["transposed"] else f"conv{d}d"
    ours, ref = getattr(convt_ext, name), getattr(F, name)
    weight_op = getattr(convt_ext, f"conv{d}d_weight")
    wkw = {k: v for k, v in kw.items() if k != "output_padding"}
    return (lambda x, w, b=None: ours(x, w, b, **kw)), (lambda x, w, b=None: ref(x, w, b, **kw)), \
        (lambda image, w_shape, windows: weight_op(image, w_shape, windows, **wkw))


def _output_shape(case):
    _, ref, _ = _functions(case)
    x = torch.empty((case["batch"], case["cin"]) + case["size"], device="meta")
    return tuple(ref(x, torch.empty(_weight_shape(case), device="meta")).shape)


def _column_bytes(case):
    """One sample's float32 columns: rows of (channels of the windowed side) x kernel, times window positions."""
    out = _output_shape(case)
    if case["transposed"]:
        return 4 * case["cout"] * math.prod(case["kernel"]) * math.prod(case["size"])
    return 4 * case["cin"] * math.prod(case["kernel"]) * math.prod(out[2:])


@functools.lru_cache(maxsize=None)
def _data(index):
    """The case's float32 values (held in float64, on the CPU): x, w, b (or None), a cotangent g,
    and reference() of them: [(ref, sq, n)] for the output and the gradients of x, w (and b)."""
    case = CASES[index]
    gen = torch.Generator().manual_seed(zlib.crc32(case["name"].encode()))

    def r(*shape):
        return torch.randn(shape, generator=gen).double()  # float32 values

    x = r(case["batch"], case["cin"], *case["size"])
    w = r(*_weight_shape(case))
    b = r(case["cout"]) if case["bias"] else None
    g = r(*_output_shape(case))
    _, ref, _ = _functions(case)
    inputs = [x, w] + ([b] if b is not None else [])
    return inputs, g, reference(ref, inputs, g)


def _layout(case, t):
    if not case["channels_last"] or t.dim() < 4:
        return t
    return t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)


def _on(case, inputs, device):
    """float32 copies on `device`, the input (and cotangent-sized) tensors in the case's layout."""
    return [_layout(case, t.float().to(device)) if i == 0 else t.float().to(device) for i, t in enumerate(inputs)]


@contextlib.contextmanager
def _workspace(case):
    old = convt_ext.workspace_limit()
    if case["workspace"] is not None:
        convt_ext.set_workspace_limit(case["workspace"])
    try:
        yield
    finally:
        convt_ext.set_workspace_limit(old)


def _forward_and_grads(case, leaves, g):
    ours, _, _ = _functions(case)
    leaves = [t.detach().requires_grad_() for t in leaves]
    y = ours(*leaves)
    return [y.detach()] + list(torch.autograd.grad(y, leaves, g))


def _check(case, got, refs, tf32):
    names = ["output", "grad_input", "grad_weight", "grad_bias"]
    for name, t, (ref, sq, n) in zip(names, got, refs):
        check_within(t, ref, sq, n, tf32, f"{case['name']} {name}")


def _gemm_calls():
    return sum(convt_ext.engine_info()["calls"].values())


# ------------------------------------------------------------------ the table, on the CPU


def test_case_table():
    """The table's own properties, so that a table that loses its data or its coverage fails
    here, without a GPU."""
    assert len(set(IDS)) == len(CASES)
    assert all(c["batch"] >= 1 for c in CASES)
    for transposed in (False, True):
        cases = [c for c in CASES if c["transposed"] == transposed]
        assert {c["dims"] for c in cases} == {1, 2, 3}
        assert {"wide", "blocks", "pixel_rows", "pointwise"} <= {c["path"] for c in cases}
        assert any(c["groups"] > 1 for c in cases)
        assert any(c["channels_last"] and c["groups"] > 1 for c in cases)
        assert any(c["channels_last"] and c["path"] != "pixel_rows" for c in cases) or transposed
        assert any(not c["bias"] for c in cases) and any(c["bias"] for c in cases)
        assert len({c["batch"] for c in cases}) >= 3
    for c in CASES:
        out = _output_shape(c)
        assert math.prod(out) > 0, c["name"]
        one_by_one = all(k == 1 for k in c["kernel"]) and all(s == 1 for s in c["stride"]) \
            and all(p == 0 for p in c["padding"]) and all(p == 0 for p in c["output_padding"])
        assert one_by_one == (c["path"] in ("pixel_rows", "pointwise")), c["name"]
        assert c["channels_last"] == (c["path"] == "pixel_rows") or c["path"] in ("wide", "depthwise"), c["name"]
        if c["path"] == "depthwise":
            assert c["groups"] == c["cin"], c["name"]
        if c["channels_last"]:
            assert c["dims"] >= 2
        if c["path"] == "wide":
            # Several samples whose columns fit the default limit together.
            assert c["batch"] >= 2 and c["workspace"] is None
            assert c["batch"] * _column_bytes(c) < convt_ext.workspace_limit()
        if c["path"] == "blocks":
            # A limit under one sample's columns: several blocks per sample.
            assert c["workspace"] < _column_bytes(c), c["name"]


@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_allowance_on_the_cpu(index, restore_workspace_limit):
    """Note [TF32 tolerance] checked where it can be: convt_ext's CPU float32 (IEEE) is within
    the IEEE allowance and shows no TF32; the same sums of operands cut to TF32 by truncation
    are within the TF32 allowance, outside the IEEE one, and show TF32; and the TF32 allowance
    of a typical element is below a typical product, so one lost product would show."""
    case = CASES[index]
    inputs, g, refs = _data(index)
    with _workspace(case):
        got = _forward_and_grads(case, _on(case, inputs, "cpu"), g.float())
    _check(case, got, refs, tf32=False)
    assert not tf32_was_used([relative_error(t, ref, sq) for t, (ref, sq, _) in zip(got[:3], refs[:3])])

    _, ref_op, _ = _functions(case)
    cut = [round_to_tf32(t.float()).double() if i < 2 else t for i, t in enumerate(inputs)]
    emulated = [r for r, _, _ in reference(ref_op, cut, round_to_tf32(g.float()).double())]
    _check(case, emulated, refs, tf32=True)
    with pytest.raises(AssertionError, match="IEEE allowance"):
        _check(case, emulated[:3], refs[:3], tf32=False)
    assert tf32_was_used([relative_error(t, ref, sq) for t, (ref, sq, _) in zip(emulated[:3], refs[:3])])

    typical_product = 2 / math.pi  # E|a|*E|b| for standard normal a, b
    for ref, sq, n in refs[:3]:
        assert allowed_error(ref, sq, n, tf32=True).median() < 0.5 * typical_product, case["name"]


def test_tf32_settings_set_and_restore():
    """Each setting of conftest.TF32_SETTINGS gives the flags it names (the "both" setting
    through the API that made torch's legacy precision getter throw), and reset_tf32 puts
    torch's defaults back."""
    from conftest import DEFAULT_TF32_STATE, TF32_SETTINGS, reset_tf32, tf32_state
    try:
        for name, (conv, matmul) in TF32_SETTINGS.items():
            set_tf32(name)
            assert (torch.backends.cudnn.conv.fp32_precision == "tf32") is conv, name
            assert (torch.backends.cuda.matmul.fp32_precision == "tf32") is matmul, name
            if name == "both":
                with pytest.raises(RuntimeError):
                    torch.get_float32_matmul_precision()
    finally:
        reset_tf32()
    assert tf32_state() == DEFAULT_TF32_STATE
    assert torch.get_float32_matmul_precision() == "highest"


# ------------------------------------------------------------------ on a GPU


@cuda_test
@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_parity_under_each_tf32_setting(index, tf32_setting, restore_workspace_limit):
    """Every op and gradient in float32 under torch's default flags and the other three
    combinations of the convolution and matmul TF32 flags, within the allowance of the
    convolution flag's precision: IEEE float32's whenever that flag is off. (Whether TF32 runs
    where allowed is cuBLAS's choice per shape; tests/test_gemm_engine.py checks that it does on
    a shape where it always does.)"""
    conv_tf32, _ = tf32_setting
    case = CASES[index]
    inputs, g, refs = _data(index)
    with _workspace(case):
        ours, _, _ = _functions(case)
        leaves = _on(case, inputs, "cuda")
        before = _gemm_calls()
        ours(*leaves)
        torch.cuda.synchronize()
        forward_calls = _gemm_calls() - before
        got = _forward_and_grads(case, leaves, g.float().cuda())
    assert all(t.device.type == "cuda" and t.dtype == torch.float32 for t in got)
    if case["path"] == "wide":
        assert forward_calls < case["batch"], forward_calls
    if case["path"] == "blocks":
        assert forward_calls > case["batch"], forward_calls
    if case["path"] == "depthwise":  # the GPU rule's: a direct kernel, no GEMM
        assert forward_calls == 0, forward_calls
    _check(case, got, refs, tf32=conv_tf32)


# cycles of torch.cuda._sleep: about 0.25 s at the 2 GHz of a recent GPU, far longer than the
# host takes to queue a forward and backward pass of these small cases.
SLEEP_CYCLES = 500_000_000


@cuda_test
@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_on_a_side_stream(index, restore_workspace_limit):
    """The ops run on the current stream. The inputs are written on a side stream after a long
    sleep there, the op and its backward pass are queued on it, and the results are read only
    after side.synchronize(): a kernel or GEMM launched on any other stream would run at once,
    on inputs that still hold NaN, every time (the test checks the sleep outlasted the queueing)."""
    case = CASES[index]
    inputs, g, refs = _data(index)
    sources = _on(case, inputs, "cuda") + [g.float().cuda()]
    buffers = [torch.full_like(s, float("nan")) for s in sources]
    side = torch.cuda.Stream()
    with _workspace(case), torch.cuda.stream(side):
        # Once without the sleep: handles, workspaces and kernels load before the timed part.
        _forward_and_grads(case, sources[:-1], sources[-1])
        torch.cuda.synchronize()
        torch.cuda._sleep(SLEEP_CYCLES)
        for buffer, source in zip(buffers, sources):
            buffer.copy_(source)
        got = _forward_and_grads(case, buffers[:-1], buffers[-1])
        queued_while_asleep = not side.query()
    side.synchronize()
    assert queued_while_asleep, "the host took longer than the sleep: raise SLEEP_CYCLES"
    _check(case, got, refs, tf32=True)


@cuda_test
@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_captured_in_a_cuda_graph_and_replayed(index, restore_workspace_limit):
    """Nothing in the ops synchronises with the host, so they capture; a replay on new data in
    the same buffers gives torch's result for that data: the op, and its weight gradient."""
    case = CASES[index]
    inputs, g, refs = _data(index)
    ours, _, weight_op = _functions(case)
    static = [torch.zeros_like(t) for t in _on(case, inputs, "cuda")]
    static_g = torch.zeros_like(g, dtype=torch.float32, device="cuda")
    w_shape = _weight_shape(case)

    def run():
        y = ours(*static)
        image, windows = (static_g, static[0]) if case["transposed"] else (static[0], static_g)
        return y, weight_op(image, w_shape, windows)

    with _workspace(case):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up, as torch.cuda.graphs asks
            run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y, grad_w = run()
    for buffer, value in zip(static + [static_g], _on(case, inputs, "cuda") + [g.float().cuda()]):
        buffer.copy_(value)
    graph.replay()
    torch.cuda.synchronize()
    _check(case, [y], refs[:1], tf32=True)
    (ref, sq, n) = refs[2]
    check_within(grad_w, ref, sq, n, True, f"{case['name']} weight op")


@cuda_test
@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_under_deterministic_algorithms(index, restore_workspace_limit):
    """Under torch.use_deterministic_algorithms(True) (which also fills new tensors with NaN, so
    an unwritten element shows), every op and gradient runs, matches torch and repeats bit for
    bit."""
    case = CASES[index]
    inputs, g, refs = _data(index)
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with _workspace(case):
            leaves = _on(case, inputs, "cuda")
            first = _forward_and_grads(case, leaves, g.float().cuda())
            second = _forward_and_grads(case, leaves, g.float().cuda())
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)
    _check(case, first, refs, tf32=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b), case["name"]


# im2col and col2im (no GEMM): an image (3, 4, 9, 8), a 3x3 window, padding 1, stride 2.
WINDOW = dict(kernel_size=3, padding=1, stride=2)


def _window_data():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 9, 8, generator=gen)
    cols = torch.randn(F.unfold(x, **WINDOW).shape, generator=gen)
    return x, cols


def _check_window_ops(x, cols, got_cols, got_image):
    assert torch.equal(got_cols.cpu(), F.unfold(x, **WINDOW))
    c = cols.double()
    fold = lambda t: F.fold(t, (9, 8), **WINDOW)  # noqa: E731
    check_within(got_image, fold(c), fold(c * c), fold(torch.ones_like(c)), False, "col2im")


@cuda_test
def test_window_ops_on_a_side_stream():
    """im2col and col2im as test_on_a_side_stream runs the convolutions."""
    x, cols = _window_data()
    sources = [x.cuda(), cols.cuda()]
    buffers = [torch.full_like(s, float("nan")) for s in sources]
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        convt_ext.im2col(sources[0], **WINDOW), convt_ext.col2im(sources[1], (9, 8), **WINDOW)
        torch.cuda.synchronize()
        torch.cuda._sleep(SLEEP_CYCLES)
        for buffer, source in zip(buffers, sources):
            buffer.copy_(source)
        got_cols = convt_ext.im2col(buffers[0], **WINDOW)
        got_image = convt_ext.col2im(buffers[1], (9, 8), **WINDOW)
        queued_while_asleep = not side.query()
    side.synchronize()
    assert queued_while_asleep, "the host took longer than the sleep: raise SLEEP_CYCLES"
    _check_window_ops(x, cols, got_cols, got_image)


def _captured(run):
    """run() warmed up on a side stream, as torch.cuda.graphs asks, then captured:
    (the graph, what the captured call returned)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    return graph, out


@cuda_test
def test_window_ops_captured_in_a_cuda_graph_and_replayed():
    x, cols = _window_data()
    static = [torch.zeros_like(x, device="cuda"), torch.zeros_like(cols, device="cuda")]

    def run():
        return convt_ext.im2col(static[0], **WINDOW), convt_ext.col2im(static[1], (9, 8), **WINDOW)

    graph, got = _captured(run)
    static[0].copy_(x)
    static[1].copy_(cols)
    graph.replay()
    torch.cuda.synchronize()
    _check_window_ops(x, cols, *got)


def _patches(t, n, i, j):
    """t's 3x3 neighbourhoods (zero outside) at samples n, rows i, columns j: (S, C, 3, 3) float64 on the CPU."""
    H, W = t.shape[-2:]
    r = torch.arange(-1, 2, device=t.device)
    rows, cols = i[:, None] + r, j[:, None] + r
    inside = ((rows >= 0) & (rows < H))[:, None, :, None] & ((cols >= 0) & (cols < W))[:, None, None, :]
    channels = torch.arange(t.shape[1], device=t.device)
    values = t[n[:, None, None, None], channels[None, :, None, None],
               rows.clamp(0, H - 1)[:, None, :, None], cols.clamp(0, W - 1)[:, None, None, :]]
    return (values * inside).double().cpu()


@cuda_test
@pytest.mark.slow
def test_past_int32_elements():
    """conv2d whose input, and conv_transpose2d whose output, hold more than 2^32 elements, each
    sample more than 2^31 (16 GiB each in float32, under 40 GiB in all): sampled elements, many
    of them past offset 2^31 within a sample and past 2^32 in all, equal the sums of their 3x3
    neighbourhoods in float64 within the TF32 allowance."""
    free, _ = torch.cuda.mem_get_info()
    if free < 40 * 2**30:
        pytest.skip("needs 40 GiB of free GPU memory")
    N, C, O, H, W = 2, 8, 2, 16384, 16385
    assert C * H * W > 2**31
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(O, C, 3, 3, generator=gen)
    S = 400
    n = torch.cat([torch.randint(0, N, (2 * S,), generator=gen), torch.tensor([0, 0, N - 1, N - 1])])
    i = torch.cat([torch.randint(0, H, (S,), generator=gen), torch.randint(H - 9, H, (S,), generator=gen),
                   torch.tensor([0, H - 1, H - 1, 0])])
    j = torch.cat([torch.randint(0, W, (2 * S,), generator=gen), torch.tensor([0, W - 1, 0, W - 1])])
    c = torch.randint(0, C, (2 * S + 4,), generator=gen)
    c[S:] = C - 1  # the last channel's last rows: offsets past 2^31 in every sample
    o = c % O
    past = ((((n * C + c) * H + i) * W + j) >= 2**31).sum().item()
    assert past >= S // 2
    n, i, j, c, o = (t.cuda() for t in (n, i, j, c, o))
    wd = w.double()

    x = torch.randn(N, C, H, W, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    assert x.numel() > 2**31
    y = convt_ext.conv2d(x, w.cuda(), padding=1)
    assert y.shape == (N, O, H, W)
    p = _patches(x, n, i, j)
    ref = (p * wd[o.cpu()]).sum((1, 2, 3))
    sq = (p * p * wd[o.cpu()] ** 2).sum((1, 2, 3))
    check_within(y[n, o, i, j], ref, sq, torch.full_like(ref, C * 9.0), True, "conv2d past 2^31")
    del x

    # conv_transpose2d of y (N, O, H, W) with a (O, C, 3, 3) weight: (N, C, H, W) again.
    out = convt_ext.conv_transpose2d(y, w.cuda(), padding=1)
    assert out.shape == (N, C, H, W) and out.numel() > 2**31
    p = _patches(y, n, i, j).flip(-1, -2)  # out[n, c, i, j] = sum y[n, o, i+1-a, j+1-b] w[o, c, a, b]
    wc = wd.permute(1, 0, 2, 3)[c.cpu()]
    ref = (p * wc).sum((1, 2, 3))
    sq = (p * p * wc**2).sum((1, 2, 3))
    check_within(out[n, c, i, j], ref, sq, torch.full_like(ref, O * 9.0), True, "conv_transpose2d past 2^31")


@cuda_test
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_on_the_second_device(index, restore_workspace_limit):
    case = CASES[index]
    inputs, g, refs = _data(index)
    with _workspace(case), torch.cuda.device(0):
        got = _forward_and_grads(case, _on(case, inputs, "cuda:1"), g.float().to("cuda:1"))
    assert all(t.device == torch.device("cuda:1") for t in got)
    _check(case, got, refs, tf32=True)


@cuda_test
def test_forward_backward_through_autograd_captured_in_a_cuda_graph():
    """A training step's convolution, forward and backward through the C++ Autograd kernels,
    captures in one CUDA graph (no host synchronisation in the autograd layer either), and a
    replay on new data gives torch's float64 gradients (TF32 off)."""
    from conftest import reset_tf32

    set_tf32("neither")
    try:
        torch.manual_seed(0)
        x = torch.zeros(2, 3, 9, 8, device="cuda", requires_grad=True)
        w = torch.zeros(4, 3, 3, 3, device="cuda", requires_grad=True)
        g = torch.zeros(2, 4, 5, 4, device="cuda")

        def step():
            y = convt_ext.functional.conv2d(x, w, stride=2, padding=1)
            return torch.autograd.grad(y, (x, w), g)

        graph, (grad_x, grad_w) = _captured(step)
        data = [torch.randn(t.shape, dtype=torch.float64) for t in (x, w, g)]
        with torch.no_grad():
            for buffer, value in zip((x, w, g), data):
                buffer.copy_(value)
        graph.replay()
        torch.cuda.synchronize()
        xr, wr = data[0].clone().requires_grad_(), data[1].clone().requires_grad_()
        ref_x, ref_w = torch.autograd.grad(F.conv2d(xr, wr, stride=2, padding=1), (xr, wr), data[2])
        torch.testing.assert_close(grad_x.cpu().double(), ref_x, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(grad_w.cpu().double(), ref_w, rtol=1e-4, atol=1e-4)
    finally:
        reset_tf32()
