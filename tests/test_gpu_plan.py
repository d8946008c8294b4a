"""The GPU's plan, run on the CPU (Note [Device policy] in csrc/plan.h).

The code paths of the convolutions are the same on every device; what differs
is the plan's policy: on a GPU one task at a time, no cache-sized chunks (the
workspace limit alone sizes the buffers), the wide path for every batch of two
or more, and no buffers kept between calls. torch.ops.convt_ext_emulated.
*_gpu_plan (a test-only extension, tests/emulated/gpu_plan.cpp) run the
library's convolution code with that policy on CPU tensors, so that CI, which
has no GPU, executes the GPU's blocks, wide batches, buffers and GEMM calls.

Each case is checked against torch in float64, and its GEMM calls
(engine_info()'s counters) and allocations (torch.profiler) are counted: one
batched GEMM serves a whole batch, and a call allocates the same buffers
whatever its batch size or number of blocks. The same counts are checked for
the batched 1x1 paths under the CPU's own policy (the public ops).
"""
import math

import pytest
import torch
import torch.nn.functional as F

import convt_ext

from emulated_ops import emulated

ops = torch.ops.convt_ext
INT64_MAX = 2**63 - 1


def gemm_calls():
    return sum(convt_ext.engine_info()["calls"].values())


def counted(fn):
    """(fn(), the GEMM calls it ran)."""
    before = gemm_calls()
    out = fn()
    return out, gemm_calls() - before


def allocations(fn):
    """The sizes in bytes of the CPU allocations fn() makes, by torch.profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sorted(e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.nbytes() > 0)


class Case:
    """One convolution: conv's view of it (conv_transpose takes its input with
    c_out channels and gives c_in)."""

    def __init__(self, n, c_in, c_out, size, kernel, stride=1, padding=0, dilation=1, groups=1,
                 output_padding=0, channels_last=False, bias=True):
        d = len(size)
        self.d, self.n, self.c_in, self.c_out, self.size = d, n, c_in, c_out, tuple(size)
        as_tuple = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,) * d  # noqa: E731
        self.kernel, self.stride, self.padding = as_tuple(kernel), as_tuple(stride), as_tuple(padding)
        self.dilation, self.output_padding = as_tuple(dilation), as_tuple(output_padding)
        self.groups, self.channels_last, self.bias = groups, channels_last, bias

    def __repr__(self):
        return (f"{self.d}d-n{self.n}-c{self.c_in}to{self.c_out}-{'x'.join(map(str, self.size))}-k{self.kernel}"
                f"-s{self.stride}-p{self.padding}-d{self.dilation}-op{self.output_padding}-g{self.groups}"
                f"{'-cl' if self.channels_last else ''}{'-bias' if self.bias else ''}")

    def tensor(self, *shape, seed):
        g = torch.Generator().manual_seed(seed)
        t = torch.randn(*shape, generator=g, dtype=torch.float64)
        if self.channels_last and len(shape) in (4, 5):
            t = t.contiguous(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
        return t

    @property
    def pointwise(self):
        return all(k == 1 for k in self.kernel) and all(s == 1 for s in self.stride) and all(p == 0 for p in self.padding)

    def conv_args(self):
        x = self.tensor(self.n, self.c_in, *self.size, seed=1)
        w = self.tensor(self.c_out, self.c_in // self.groups, *self.kernel, seed=2)
        b = self.tensor(self.c_out, seed=3) if self.bias else None
        return x, w, b, list(self.stride), list(self.padding), list(self.dilation), self.groups

    def transpose_args(self):
        x = self.tensor(self.n, self.c_out, *self.size, seed=4)
        w = self.tensor(self.c_out, self.c_in // self.groups, *self.kernel, seed=5)
        b = self.tensor(self.c_in, seed=6) if self.bias else None
        return (x, w, b, list(self.stride), list(self.padding), list(self.output_padding), self.groups,
                list(self.dilation))


F_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
F_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
GRAD_WEIGHT = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}

# Every path of the column code and of the pixel rows: the wide path (batch
# >= 2) and blocks (batch 1), groups, 1x1 planar and channels_last, strides,
# padding, dilation, output_padding, 1-, 2- and 3-d.
CASES = [
    Case(4, 3, 8, (9, 7), 3, padding=1),
    Case(1, 3, 8, (9, 7), 3, padding=1),
    Case(3, 4, 6, (8, 9), (3, 2), stride=2, padding=(1, 0), dilation=(1, 2), groups=2, output_padding=(1, 0)),
    Case(5, 6, 4, (6, 6), 1, groups=2),
    Case(4, 8, 8, (5, 6), 1, groups=4, channels_last=True),
    Case(3, 6, 4, (7, 5), 1, channels_last=True, bias=False),
    Case(2, 6, 9, (4, 5), 1, groups=3, bias=False),
    Case(1, 4, 6, (5, 5), 1, groups=2, channels_last=True),
    Case(3, 4, 6, (7, 8), 3, stride=2, padding=1, channels_last=True),
    Case(2, 3, 4, (11,), 3, stride=2, padding=2, dilation=2, output_padding=1),
    Case(6, 4, 4, (10,), 1, groups=4),
    Case(2, 2, 4, (4, 5, 3), (2, 3, 1), padding=(1, 1, 0), groups=2),
    Case(2, 4, 4, (3, 4, 3), 1, channels_last=True),
]


def test_cases_cover_every_path():
    """The table keeps real batches, the wide path (batch >= 2) and blocks (1), groups,
    1x1 planar and channels_last (grouped and not), strides, output_padding, 1-, 2-, 3-d."""
    assert all(c.n >= 1 for c in CASES)
    assert {c.d for c in CASES} == {1, 2, 3}
    assert any(c.n == 1 for c in CASES) and sum(c.n >= 2 for c in CASES) >= 8
    one_by_one = [c for c in CASES if c.pointwise]
    assert any(c.channels_last and c.groups > 1 for c in one_by_one)
    assert any(not c.channels_last and c.groups > 1 for c in one_by_one)
    assert any(c.channels_last and not c.pointwise for c in CASES)
    assert any(max(c.stride) > 1 for c in CASES) and any(max(c.output_padding) > 0 for c in CASES)


def test_the_plan_is_a_gpus():
    """The emulation runs the policy the library gives a CUDA tensor, which differs from the
    CPU's in every field that the plan reads."""
    tasks, parallel, chunk, tile, wide_below, wide_pointwise, keep = emulated().gpu_policy()
    assert (tasks, parallel, chunk, tile, wide_below, wide_pointwise, keep) == (1, 0, INT64_MAX, INT64_MAX, INT64_MAX, 1, 0)


def _expected_calls(case, op):
    """GEMM calls of one op under the GPU policy with the default workspace limit: one
    batched GEMM per op (two for conv_transpose's backward, one per product); a grouped
    planar 1x1 conv_transpose, whose weight is no single strided batch over samples and
    groups, one per sample or per group, whichever are fewer."""
    # The depthwise path's GPU rule: no GEMM for a conv with one input channel per
    # group, or a conv_transpose (from c_out channels) with one per group.
    if (op == "conv" and case.c_in == case.groups) or (op == "conv_transpose" and case.c_out == case.groups):
        return 0
    if op == "conv_transpose" and case.pointwise and not case.channels_last and max(case.output_padding) == 0:
        return min(case.n, case.groups)
    return 2 if op == "conv_transpose_backward" else 1


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_gpu_plan_conv(case):
    x, w, b, stride, padding, dilation, groups = case.conv_args()
    out, calls = counted(lambda: emulated().conv_gpu_plan(x, w, b, stride, padding, dilation, groups))
    expected = F_CONV[case.d](x, w, b, stride, padding, dilation, groups)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert out.stride() == ops.__getattr__(f"conv{case.d}d")(x, w, b, stride, padding, dilation, groups).stride()
    assert calls == _expected_calls(case, "conv")


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_gpu_plan_conv_transpose(case):
    args = case.transpose_args()
    out, calls = counted(lambda: emulated().conv_transpose_gpu_plan(*args))
    x, w, b, stride, padding, output_padding, groups, dilation = args
    expected = F_CONV_T[case.d](x, w, b, stride, padding, output_padding, groups, dilation)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert out.stride() == ops.__getattr__(f"conv_transpose{case.d}d")(*args).stride()
    assert calls == _expected_calls(case, "conv_transpose")


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_gpu_plan_conv_weight(case):
    x, w, _, stride, padding, dilation, groups = case.conv_args()
    dy = F_CONV[case.d](x, w, None, stride, padding, dilation, groups).contiguous()
    dy = case.tensor(*dy.shape, seed=7)
    out, calls = counted(lambda: emulated().conv_weight_gpu_plan(x, dy, list(w.shape), stride, padding, dilation, groups))
    expected = GRAD_WEIGHT[case.d](x, w.shape, dy, stride, padding, dilation, groups)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert calls == _expected_calls(case, "conv_weight")


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_gpu_plan_conv_transpose_backward(case):
    x, w, _, stride, padding, output_padding, groups, dilation = case.transpose_args()
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = F_CONV_T[case.d](xr, wr, None, stride, padding, output_padding, groups, dilation)
    dy = case.tensor(*y.shape, seed=8)
    expected = torch.autograd.grad(y, (xr, wr), dy)
    (gx, gw), calls = counted(
        lambda: emulated().conv_transpose_backward_gpu_plan(dy, x, w, stride, padding, output_padding, groups, dilation))
    torch.testing.assert_close(gx, expected[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, expected[1], rtol=1e-12, atol=1e-12)
    assert calls == _expected_calls(case, "conv_transpose_backward")


# ---------------------------------------------------------------- allocations


def _ops_of(case):
    """Each op of `case` under the GPU plan, as (name, call, result)."""
    e = emulated()
    x, w, b, stride, padding, dilation, groups = case.conv_args()
    dy = case.tensor(*F_CONV[case.d](x, w, None, stride, padding, dilation, groups).shape, seed=9)
    targs = case.transpose_args()
    ty = case.tensor(*F_CONV_T[case.d](*targs).shape, seed=10)
    tx, tw = targs[0], targs[1]
    rest = targs[3:]
    return [
        ("conv", lambda: e.conv_gpu_plan(x, w, b, stride, padding, dilation, groups)),
        ("conv_transpose", lambda: e.conv_transpose_gpu_plan(*targs)),
        ("conv_weight", lambda: e.conv_weight_gpu_plan(x, dy, list(w.shape), stride, padding, dilation, groups)),
        ("conv_transpose_backward", lambda: e.conv_transpose_backward_gpu_plan(ty, tx, tw, *rest)),
    ]


def _allocations_per_call(fn):
    fn()  # first-call work (lazy initialisation) is not the call's
    return allocations(fn)


@pytest.mark.parametrize("case", [Case(2, 4, 6, (7, 6), 3, padding=1, groups=2),
                                  Case(2, 6, 4, (6, 5), 1, groups=2),
                                  Case(2, 4, 8, (5, 4), 1, groups=2, channels_last=True),
                                  Case(2, 3, 4, (9,), 3, stride=2, output_padding=1)], ids=repr)
def test_gpu_plan_allocates_per_call_not_per_sample(case):
    """A GPU's call allocates the same buffers for a batch of 2 and of 12: its wide batches
    take the whole batch in one buffer, and nothing is allocated per sample or per group."""
    big = Case(12, case.c_in, case.c_out, case.size, case.kernel, case.stride, case.padding, case.dilation,
               case.groups, case.output_padding, case.channels_last, case.bias)
    for (name, small_call), (_, big_call) in zip(_ops_of(case), _ops_of(big)):
        small, large = _allocations_per_call(small_call), _allocations_per_call(big_call)
        assert len(small) >= 1, (name, small)
        assert len(small) == len(large), (name, small, large)


@pytest.mark.parametrize("case", [Case(1, 4, 4, (12, 10), 3, padding=1, groups=2),
                                  Case(1, 3, 4, (25, 21), 3, stride=2, padding=1),
                                  Case(1, 1, 4, (6, 5, 4), 3, padding=1)], ids=repr)
def test_gpu_plan_blocks_allocate_per_call_not_per_block(case, restore_workspace_limit):
    """Under a small workspace limit a GPU's call splits its samples into blocks, one GEMM
    each, in buffers allocated once per call, none larger than the limit (only the
    results may be)."""
    seen = {}
    for limit in (16 << 10, 6 << 10):  # each above one window position's columns
        convt_ext.set_workspace_limit(limit)
        for name, call in _ops_of(case):
            result = call()
            results = result if isinstance(result, tuple) else (result,)
            sizes = _allocations_per_call(call)
            _, calls = counted(call)
            for size in sizes:
                assert size <= limit or size in {r.nbytes for r in results}, (name, limit, sizes)
            seen.setdefault(name, []).append((len(sizes), calls))
    for name, ((count_a, calls_a), (count_b, calls_b)) in seen.items():
        assert calls_b > calls_a >= 2, (name, seen[name])  # more, smaller blocks
        assert count_a == count_b, (name, seen[name])  # the same buffers


def test_gpu_plan_matches_torch_under_a_small_workspace_limit(restore_workspace_limit):
    """Blocks and wide chunks under a GPU's plan give torch's results."""
    convt_ext.set_workspace_limit(4 << 10)
    for case in CASES:
        x, w, b, stride, padding, dilation, groups = case.conv_args()
        out, calls = counted(lambda: emulated().conv_gpu_plan(x, w, b, stride, padding, dilation, groups))
        torch.testing.assert_close(out, F_CONV[case.d](x, w, b, stride, padding, dilation, groups), rtol=1e-12, atol=1e-12)
        args = case.transpose_args()
        out = emulated().conv_transpose_gpu_plan(*args)
        torch.testing.assert_close(out, F_CONV_T[case.d](*args), rtol=1e-12, atol=1e-12)


# ------------------------------------------------- the batched 1x1 paths on the CPU's plan


ONE_BY_ONE = [c for c in CASES if c.pointwise]


@pytest.mark.parametrize("case", ONE_BY_ONE, ids=repr)
def test_cpu_plan_one_by_one_is_batched(case):
    """The public ops (the CPU's plan) on 1x1 layers: torch's results, and one GEMM per
    range of samples or pixels (ranges: at most the usable cores), batched over the groups
    (channels_last) or over the samples (planar conv_transpose), never one per sample and
    group."""
    tasks = convt_ext.engine_info()["cores"]
    # The column path's plan, which "auto" leaves for the depthwise path's direct sums on
    # groups of few channels.
    before = convt_ext.conv_path()
    convt_ext.set_conv_path("columns")
    try:
        _one_by_one_on_columns(case, tasks)
    finally:
        convt_ext.set_conv_path(before)


def _one_by_one_on_columns(case, tasks):
    x, w, b, stride, padding, dilation, groups = case.conv_args()
    conv = getattr(ops, f"conv{case.d}d")
    out, calls = counted(lambda: conv(x, w, b, stride, padding, dilation, groups))
    torch.testing.assert_close(out, F_CONV[case.d](x, w, b, stride, padding, dilation, groups), rtol=1e-12, atol=1e-12)
    pixels = case.n * math.prod(case.size)
    if case.channels_last:
        assert calls == min(pixels, tasks)
    else:  # the planar image is its own column matrix: read in place, a GEMM per sample (no wide copy)
        assert calls >= case.n
    targs = case.transpose_args()
    out, calls = counted(lambda: getattr(ops, f"conv_transpose{case.d}d")(*targs))
    torch.testing.assert_close(out, F_CONV_T[case.d](*targs), rtol=1e-12, atol=1e-12)
    if case.channels_last:
        assert calls == min(pixels, tasks)
    else:
        ranges = min(math.prod(case.size), tasks) if case.n < tasks else min(case.n, tasks)
        per_range = math.ceil(case.n / ranges) if case.n >= tasks else case.n
        assert calls <= ranges * min(per_range, case.groups)
        if case.groups == 1:
            assert calls == ranges
    dy = case.tensor(*F_CONV[case.d](x, w, None, stride, padding, dilation, groups).shape, seed=11)
    conv_weight = getattr(ops, f"conv{case.d}d_weight")
    grad, calls = counted(lambda: conv_weight(x, dy, list(w.shape), stride, padding, dilation, groups))
    expected = GRAD_WEIGHT[case.d](x, w.shape, dy, stride, padding, dilation, groups)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)
    if case.channels_last:  # pixel rows (one sample) or one wide chunk: a GEMM per range
        assert calls == min(pixels, tasks)
    else:  # per sample, in place, as conv
        assert calls >= case.n
