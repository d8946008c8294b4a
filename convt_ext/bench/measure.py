"""Measuring one case: the comparators (torch's kernels next to ours), the
check against torch's default, and the timing.

The implementations compared:
  convt_ext     convt_ext.im2col / col2im / conv{1,2,3}d / conv_transpose{1,2,3}d
  torch         torch's default: F.conv{1,2,3}d / F.conv_transpose{1,2,3}d (oneDNN on CPU
                where it applies, cuDNN on CUDA); F.unfold / F.fold for 2-d im2col/col2im
                (1-d: the same on a unit-height image); for 3-d, where torch has no unfold,
                strided window views (Tensor.unfold) copied into columns, and for col2im
                their adjoint, a grouped F.conv_transpose3d with one-hot kernels
  torch_im2col  torch's own im2col-based kernels: torch._C._nn.thnn_conv2d and slow_conv3d
                (groups=1, dilation=1), slow_conv_transpose2d and slow_conv_transpose3d
                (groups=1); 1-d layers as 2-d ones of unit height, as F.conv1d does
  unfoldNd      unfoldNd.unfoldNd / foldNd for im2col/col2im, when that package is installed
"""
from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch.utils import benchmark

import convt_ext

from .._geometry import output_padding_to_reach, prod
from .suite import BACKWARD, CONV_OPS, UNFOLD_OPS

IMPLS = ("convt_ext", "torch", "torch_channels_last", "torch_im2col", "unfoldNd")  # also the order of the first round
FAILED = ("FAIL", "error")  # case statuses that make the exit status 1
NOT_BUILT = "not built"  # the installed convt_ext lacks the op (or its 1-d/3-d form): skipped, not failed
SLOW_CALL_S = 2.0  # a comparator whose checked call takes longer is timed by that one call, not in rounds
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
# (rtol, atol); atol is relative to the largest magnitude of the reference tensor.
TOLERANCES = {
    torch.float64: (1e-7, 1e-9),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 2e-3),
    torch.bfloat16: (5e-2, 1.6e-2),
}
# GEMM shapes (m, k, n) of the peak measurement, C[m, n] = A[m, k] B[k, n]: square ones and the
# tall-skinny kind an im2col convolution produces (ResNet conv2_x: 56*56 pixels, 64*9 taps, 256).


# ------------------------------------------------------------ the comparators


@dataclass
class Impl:
    label: Union[str, Callable]  # how the report names it, or (shape) -> that name
    fn: Callable  # (shape, tensors) -> output tensor
    skip: Callable = lambda shape: None  # (shape) -> why it does not apply, or None

    def name(self, shape):
        return self.label(shape) if callable(self.label) else self.label


@dataclass
class Op:
    rate: str  # "GFLOP/s" or "GB/s"
    impls: dict = field(default_factory=dict)
    impls: dict = field(default_factory=dict)


def _missing(name):
    return None if hasattr(torch._C._nn, name) else f"torch._C._nn.{name} is not in torch {torch.__version__}"


def _as_2d(s):
    """kernel, stride, padding, output_padding, dilation of a 1-d layer as a 2-d one of unit height."""
    return ((1, *s.kernels), (1, *s.strides), (0, *s.paddings), (0, *s.output_paddings), (1, *s.dilations))


def _nd(s):
    return s.kernels, s.strides, s.paddings, s.output_paddings, s.dilations


def _slow_name(s):
    """torch's im2col-based kernel for the layer (1-d goes through the 2-d one, as F.conv1d does)."""
    if s.transposed:
        return "slow_conv_transpose3d" if s.dims == 3 else "slow_conv_transpose2d"
    return "slow_conv3d" if s.dims == 3 else "thnn_conv2d"


def _slow_label(s):
    return _slow_name(s) + (" (as 2-d)" if s.dims == 1 else "")


def _slow_skip(s):
    name = _slow_name(s)
    reason = _missing(name)
    if reason is None and s.groups != 1:
        reason = f"{name} takes no groups (groups={s.groups})"
    if reason is None and not s.transposed and any(d != 1 for d in s.dilations):
        reason = f"{name} takes no dilation (dilation={s.dilation})"
    return reason


def _slow_conv(s, t):
    x, w, b = t["x"], t["w"], t["b"]
    k, st, p, op, d = _as_2d(s) if s.dims == 1 else _nd(s)
    if s.dims == 1:
        x, w = x.unsqueeze(2), w.unsqueeze(2)
    fn = getattr(torch._C._nn, _slow_name(s))
    y = fn(x, w, k, b, st, p, op, d) if s.transposed else fn(x, w, k, b, st, p)
    return y.squeeze(2) if s.dims == 1 else y


def _conv_fn(module, suffix=""):
    """(shape, tensors) -> module's conv{d}d / conv_transpose{d}d of the layer (F or convt_ext),
    on the tensors t["x" + suffix] and t["w" + suffix]."""
    def fn(s, t):
        conv = getattr(module, s.conv)
        x, w = t["x" + suffix], t["w" + suffix]
        if s.transposed:
            return conv(x, w, t["b"], s.stride, s.padding, s.output_padding, s.groups, s.dilation)
        return conv(x, w, t["b"], s.stride, s.padding, s.dilation, s.groups)
    return fn


def _channels_last_skip(s):
    return "1-d: no channels_last format" if s.dims == 1 else None


def _unfold_args(s):
    return s.kernels, s.dilations, s.paddings, s.strides


def _onehot(s, device, dtype):
    """Kernels (C*K, 1, *kernel) of a grouped conv that copies tap j of channel c to output
    channel c*K + j: im2col's row order, so the conv is im2col and its adjoint col2im."""
    c, k = s.big[0], prod(s.kernels)
    eye = torch.eye(k, device=device, dtype=dtype).reshape(k, 1, *s.kernels)
    return eye.repeat(c, *(1,) * (s.dims + 1))


def _tensor_unfold(s, x):
    """3-d im2col in plain torch: pad, take strided window views (Tensor.unfold), copy in (c, taps, windows) order."""
    n, c = x.shape[:2]
    pads = [q for p in reversed(s.paddings) for q in (p, p)]
    v = F.pad(x, pads) if any(pads) else x
    for dim, (k, st, d) in enumerate(zip(s.kernels, s.strides, s.dilations), start=2):
        v = v.unfold(dim, d * (k - 1) + 1, st)  # appends the window's extent as the last dim
        if d != 1:
            v = v[..., ::d]
    # (N, C, *windows, *taps) -> (N, C, *taps, *windows)
    v = v.permute(0, 1, *range(2 + s.dims, 2 + 2 * s.dims), *range(2, 2 + s.dims))
    return v.reshape(n, c * prod(s.kernels), -1)


def _torch_im2col(s, t):
    x = t["x"]
    if s.dims == 2:
        return F.unfold(x, *_unfold_args(s))
    if s.dims == 1:
        k, st, p, _, d = _as_2d(s)
        return F.unfold(x.unsqueeze(2), k, d, p, st)
    return _tensor_unfold(s, x)


def _torch_col2im(s, t):
    x, (c, sizes) = t["x"], s.big
    if s.dims == 2:
        return F.fold(x, sizes, *_unfold_args(s))
    if s.dims == 1:
        k, st, p, _, d = _as_2d(s)
        return F.fold(x, (1, *sizes), k, d, p, st).squeeze(2)
    # The adjoint of the one-hot conv3d that is im2col. A transposed conv crops its padding from
    # both ends, so the image's last elements that no window starts need output_padding
    # (always < stride, as torch requires).
    cols = x.reshape(x.shape[0], c * prod(s.kernels), *s.windows)
    output_padding = list(map(output_padding_to_reach, s.windows, sizes, s.kernels, s.strides, s.paddings,
                              s.dilations))
    return F.conv_transpose3d(cols, t["onehot"], None, s.strides, s.paddings, output_padding, c, s.dilations)


def _torch_unfold_label(op):
    def label(s):
        if s.dims == 3:
            return "Tensor.unfold" if op == "im2col" else "F.conv_transpose3d one-hot"
        return ("F.unfold" if op == "im2col" else "F.fold") + (" (as 2-d)" if s.dims == 1 else "")
    return label


def unfoldnd():
    try:
        import unfoldNd
    except ImportError:
        return None
    return unfoldNd


def _unfoldnd_skip(s):
    return None if unfoldnd() is not None else "unfoldNd is not installed (pip install unfoldNd)"


OPS = {
    "im2col": Op("GB/s", {
        "convt_ext": Impl("convt_ext.im2col", lambda s, t: convt_ext.im2col(t["x"], *_unfold_args(s))),
        "torch": Impl(_torch_unfold_label("im2col"), _torch_im2col),
        "unfoldNd": Impl("unfoldNd.unfoldNd", lambda s, t: unfoldnd().unfoldNd(t["x"], *_unfold_args(s)), _unfoldnd_skip),
    }),
    "col2im": Op("GB/s", {
        "convt_ext": Impl("convt_ext.col2im", lambda s, t: convt_ext.col2im(t["x"], s.big[1], *_unfold_args(s))),
        "torch": Impl(_torch_unfold_label("col2im"), _torch_col2im),
        "unfoldNd": Impl("unfoldNd.foldNd", lambda s, t: unfoldnd().foldNd(t["x"], s.big[1], *_unfold_args(s)), _unfoldnd_skip),
    }),
}
for _op in CONV_OPS:
    OPS[_op] = Op("GFLOP/s", {
        "convt_ext": Impl(f"convt_ext.{_op}", _conv_fn(convt_ext)),
        "torch": Impl(f"F.{_op}", _conv_fn(F)),
        # torch on channels_last copies of the same tensors, converted before the timing
        "torch_channels_last": Impl(f"F.{_op} (channels_last)", _conv_fn(F, "_cl"), _channels_last_skip),
        "torch_im2col": Impl(_slow_label, _slow_conv, _slow_skip),
    })


_PROBED = {}


def not_built(op, dims, device="cpu"):
    """Why the convt_ext in use cannot run `op` on dims-d input, or None when it can.

    A build that predates an op (or its 1-d/3-d form) lacks the function, or
    raises on a tiny call; such cases are reported as "not built", not as
    failures. Only the probe's exception decides: a wrong result on a real
    case is still a FAIL."""
    key = (op, dims, str(device))
    if key not in _PROBED:
        _PROBED[key] = _probe(op, dims, device)
    return _PROBED[key]


def _probe(op, dims, device):
    fn = getattr(convt_ext, op, None)
    if fn is None:
        return f"convt_ext {convt_ext.__version__} has no {op} (rebuild: pip install --no-build-isolation .)"
    two, three = (2,) * dims, (3,) * dims

    def zeros(*shape):
        return torch.zeros(*shape, device=device)

    try:
        if op == "im2col":
            fn(zeros(1, 1, *three), two)
        elif op == "col2im":
            fn(zeros(1, 2**dims, 2**dims), three, two)
        elif op.startswith("conv_transpose"):
            fn(zeros(1, 1, *two), zeros(1, 1, *two))
        else:
            fn(zeros(1, 1, *three), zeros(1, 1, *two))
    except Exception as exc:  # noqa: BLE001 - the build's answer, reported
        first = f"{type(exc).__name__}: {exc}".splitlines()[0]
        return f"convt_ext.{op} does not take {dims}-d input in this build ({first})"
    return None


def make_inputs(op, s, batch, device, dtype, requires_grad, channels_last=False):
    """The tensors of one case: x (image, columns or conv input), w and b
    (None for im2col/col2im), and for 3-d col2im the one-hot kernels of
    torch's version. Weights are scaled by 1/sqrt(fan-in). With
    channels_last, a 2-d or 3-d convolution's x and w are channels_last
    (channels_last_3d), for every implementation alike."""
    layout = {2: torch.channels_last, 3: torch.channels_last_3d}.get(s.dims) if channels_last else None

    def randn(*shape, scale=1.0):
        t = (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(dtype)
        if layout is not None and len(shape) == s.dims + 2:
            t = t.contiguous(memory_format=layout)
        return t.requires_grad_(requires_grad)

    c_big, sizes = s.big
    if op in UNFOLD_OPS:
        x = randn(batch, c_big, *sizes) if op == "im2col" else randn(batch, c_big * prod(s.kernels), prod(s.windows))
        onehot = _onehot(s, device, dtype) if s.dims == 3 and op == "col2im" else None
        return {"x": x, "w": None, "b": None, "onehot": onehot}
    taps = prod(s.kernels)
    if s.transposed:
        w_shape = (s.c_in, s.c_out // s.groups, *s.kernels)
        fan_in = s.c_in // s.groups * taps / prod(s.strides)
    else:
        w_shape = (s.c_out, s.c_in // s.groups, *s.kernels)
        fan_in = s.c_in // s.groups * taps
    t = {
        "x": randn(batch, s.c_in, *s.sizes),
        "w": randn(*w_shape, scale=1 / math.sqrt(max(fan_in, 1))),
        "b": randn(s.c_out) if s.bias else None,
    }
    if s.dims > 1:
        cl = {2: torch.channels_last, 3: torch.channels_last_3d}[s.dims]
        for key in ("x", "w"):
            t[key + "_cl"] = t[key].detach().contiguous(memory_format=cl).requires_grad_(requires_grad)
    return t


# -------------------------------------------------------------------- timing


def time_call(fn, min_run_time):
    """(median seconds per call, every per-call time) of fn(), by
    torch.utils.benchmark: it warms up, picks a block size and synchronizes
    CUDA. Runs with torch's current thread count (Timer's default is one)."""
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return m.median, list(m.times)


def check(actual, expected, dtype, names):
    """None when every actual tensor is close to its expected one, with its
    strides (memory format), else a one-line description of the first
    mismatch."""
    rtol, atol = TOLERANCES[dtype]
    for name, a, e in zip(names, actual, expected):
        if a.shape == e.shape and a.stride() != e.stride() and a.dim() >= 4:
            return f"{name}: strides {a.stride()} where torch's are {e.stride()} (memory format)"
        scale = max(e.detach().abs().max().item(), 1.0) if e.numel() else 1.0
        try:
            torch.testing.assert_close(a, e, rtol=rtol, atol=atol * scale)
        except AssertionError as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            return f"{name}: " + "; ".join(lines[:4])
    return None


def _backend(case, t):
    """The kernel torch's default dispatch picks (Mkldnn, Cudnn, Slow2d, ...)."""
    if case.op not in CONV_OPS or not hasattr(torch._C, "_select_conv_backend"):
        return None
    s = case.shape
    try:
        b = torch._C._select_conv_backend(
            t["x"], t["w"], t["b"], s.strides, s.paddings, s.dilations,
            s.transposed, s.output_paddings, s.groups, None)
    except Exception:  # noqa: BLE001 - private API, informational only
        return None
    members = type(b).__members__
    name = next((k for k, v in members.items() if v == b), None)
    if name is None and "Mkldnn" in members and "MkldnnEmpty" in members:
        # The Python binding leaves out MkldnnTranspose, which sits between these two.
        if members["Mkldnn"].value < b.value < members["MkldnnEmpty"].value:
            name = "MkldnnTranspose"
    return name or f"backend#{b.value}"


def _autocast(dtype, device, fn, s, t):
    with torch.autocast(torch.device(device).type, dtype=dtype):
        return fn(s, t)


def run_case(case, device, dtype, rounds, min_run_time, channels_last=False, autocast=None, impls=IMPLS):
    """Check every implementation of one case against torch's default, then
    time those that pass in `rounds` interleaved rounds. Returns a dict (the
    JSON record); status "ok", "FAIL"/"error" when convt_ext is wrong or
    raises, "skipped" when torch's default raises (no reference), "not built"
    when the convt_ext in use lacks the op or its 1-d/3-d form. With
    `autocast` (a dtype), float32 inputs and every call under torch.autocast,
    checked to that dtype's tolerance. `impls`: the implementations to run
    (IMPLS' keys; convt_ext and torch always), e.g. just those two for a
    model's layers, where the other comparators would only add time."""
    op, s = OPS[case.op], case.shape
    backward = case.direction == BACKWARD
    batch = s.batch(device)
    record = {
        "op": case.op, "dims": s.dims, "direction": case.direction, "shape": s.name, "batch": batch,
        "layer": {"kernels": list(s.kernels), "c_in": s.c_in, "c_out": s.c_out, "groups": s.groups},
        "torch_backend": None, "status": "ok", "error": None, "impls": {},
        "load_average": load_average(),  # other processes on the machine skew timings
    }
    if case.op in UNFOLD_OPS:
        record["bytes"] = s.unfold_bytes(batch, torch.empty((), dtype=dtype).element_size())
    else:
        record["flops"] = s.flops(batch) * (3 if backward else 1)
    reason = not_built(case.op, s.dims, device)
    if reason:
        record.update(status=NOT_BUILT, error=reason)
        return record

    torch.manual_seed(0)
    t = make_inputs(case.op, s, batch, device, dtype, requires_grad=backward, channels_last=channels_last)
    record["torch_backend"] = _backend(case, t)
    leaves = [v for v in (t["x"], t["w"], t["b"]) if v is not None]
    names = ["grad_input", "grad_weight", "grad_bias"][: len(leaves)] if backward else ["output"]

    def runner(impl, key="convt_ext"):
        if autocast is not None:
            fn = impl.fn
            impl = Impl(impl.label, lambda s_, t_: _autocast(autocast, device, fn, s_, t_))
        if not backward:
            return lambda: impl.fn(s, t)
        # The gradient of sum(output * grad) with respect to input, weight and bias
        # (torch_channels_last: its own channels_last copies of input and weight).
        own = [t["x_cl"], t["w_cl"], *leaves[2:]] if key == "torch_channels_last" else leaves
        return lambda: torch.autograd.grad(impl.fn(s, t), own, grad)

    def as_tuple(r):
        return r if isinstance(r, tuple) else (r,)

    try:
        grad = None
        if backward:
            with torch.no_grad():
                grad = torch.randn_like(op.impls["torch"].fn(s, t))
        expected = as_tuple(runner(op.impls["torch"])())
    except Exception as exc:  # noqa: BLE001 - e.g. a dtype torch lacks here: nothing to check against
        record.update(status="skipped", error=f"torch: {type(exc).__name__}: {exc}".splitlines()[0])
        return record

    timed, once = {}, {}
    for key in IMPLS:
        impl = op.impls.get(key) if key in (*impls, "convt_ext", "torch") else None
        if impl is None:
            continue
        entry = record["impls"][key] = {"label": impl.name(s), "status": "ok", "note": None}
        reason = impl.skip(s)
        if reason:
            entry.update(status="n/a", note=reason)
            continue
        fn = runner(impl, key)
        try:
            begun = time.perf_counter()
            got = as_tuple(fn())
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - begun
            problem = check(got, expected, autocast or dtype, names)
            del got
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            problem, entry["status"] = f"{type(exc).__name__}: {exc}".splitlines()[0], "error"
        if problem is None:
            if key != "convt_ext" and elapsed > SLOW_CALL_S:
                # e.g. unfoldNd's one-hot conv3d, which oneDNN runs for seconds on some 3-d shapes
                once[key] = elapsed
                entry.update(timed_once=True, note=f"one call took {elapsed:.1f} s: timed by that call, not in rounds")
            else:
                timed[key] = fn
            continue
        if key == "convt_ext":
            entry["status"] = "error" if entry["status"] == "error" else "FAIL"
            record.update(status=entry["status"], error=problem)
        else:  # torch's internal kernel or unfoldNd: unsupported here (no backward, dtype) or off
            entry.update(status="n/a" if entry["status"] == "error" else "mismatch")
        entry["note"] = problem
    if record["status"] != "ok":
        return record  # a wrong result is not timed

    for key in timed:
        record["impls"][key].update(round_median_s=[], round_times_s=[])
    order = list(timed)
    for r in range(rounds):
        for key in order[r % len(order):] + order[: r % len(order)]:  # rotate who goes first
            median, times = time_call(timed[key], min_run_time)
            record["impls"][key]["round_median_s"].append(median)
            record["impls"][key]["round_times_s"].append(times)
    for key, elapsed in once.items():
        record["impls"][key].update(round_median_s=[elapsed] * rounds, round_times_s=[[elapsed]])
    for key in (*timed, *once):
        entry = record["impls"][key]
        entry["median_s"] = statistics.median(entry["round_median_s"])
    if case.op in UNFOLD_OPS and not backward:
        # Into a reused column (or image) buffer: no fresh output's page faults.
        buffer = op.impls["convt_ext"].fn(s, t)
        again = lambda: _unfold_into(case.op, s, t, buffer)  # noqa: E731
        record["out_round_median_s"] = [time_call(again, min_run_time)[0] for _ in range(rounds)]
        record["out_median_s"] = statistics.median(record["out_round_median_s"])
    ours = record["impls"]["convt_ext"]["round_median_s"]
    record["speedup"] = {}
    for key in (*timed, *once):
        if key != "convt_ext":
            ratios = [a / b for a, b in zip(record["impls"][key]["round_median_s"], ours)]
            record["speedup"][key] = {"median": statistics.median(ratios), "rounds": ratios}
    return record


def _unfold_into(op, s, t, out):
    """convt_ext's im2col/col2im of a case, written into `out`."""
    if op == "im2col":
        return convt_ext.im2col(t["x"], *_unfold_args(s), out=out)
    return convt_ext.col2im(t["x"], s.big[1], *_unfold_args(s), out=out)


def load_average():
    """The 1-minute load average (None where the OS has none): other processes skew timings."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None
