"""Benchmark convt_ext against PyTorch's own kernels.

    python -m convt_ext.bench                 # the full suite (CUDA when available)
    python -m convt_ext.bench --quick         # a few small shapes, one round (< 1 min on 2 CPU cores)
    python -m convt_ext.bench --ops conv_transpose2d --shapes dcgan --dtype bfloat16

For every case (op x shape x direction) each implementation is first checked
against torch's default kernel (torch.testing.assert_close), then timed with
torch.utils.benchmark.Timer.blocked_autorange, ours and torch's interleaved
over R rounds. Each figure is the median over rounds; speedups are the median
of per-round ratios torch_time / our_time (> 1: convt_ext is faster).

The implementations compared:
  convt_ext     convt_ext.im2col / col2im / conv2d / conv_transpose2d
  torch         F.unfold / F.fold / F.conv2d / F.conv_transpose2d (torch's default:
                oneDNN on CPU where it applies, cuDNN on CUDA)
  torch_im2col  torch's own im2col-based kernels, torch._C._nn.thnn_conv2d
                (groups=1, dilation=1) and torch._C._nn.slow_conv_transpose2d (groups=1)

The report (terminal table, summary, JSON, optional PNG chart) is built from
the list of results only; see benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils import benchmark

import convt_ext

OP_NAMES = ("im2col", "col2im", "conv2d", "conv_transpose2d")
FORWARD, BACKWARD = "forward", "forward+backward"
IMPLS = ("convt_ext", "torch", "torch_im2col")  # also the order of the first round
FAILED = ("FAIL", "error")  # case statuses that make the exit status 1
CUDA_SCALE = 8  # CUDA batch = CPU batch x CUDA_SCALE unless a shape says otherwise
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
# (rtol, atol); atol is relative to the largest magnitude of the reference tensor.
TOLERANCES = {
    torch.float64: (1e-7, 1e-9),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 2e-3),
    torch.bfloat16: (5e-2, 1.6e-2),
}


# ---------------------------------------------------------------------- suite


@dataclass(frozen=True)
class Shape:
    """One layer of a network, benchmarked for the ops in `ops`.

    A direct layer (transposed=False) maps (n, c_in, size, size) to c_out
    channels with conv2d; a transposed layer maps its (small) input
    (n, c_in, size, size) to c_out channels of a larger output with
    conv_transpose2d. im2col/col2im use the layer's window geometry on its
    large side (a conv2d's input, a conv_transpose2d's output): the columns
    hold one window per pixel of the small side. All images are square.
    """

    name: str
    description: str
    ops: tuple
    n: int  # batch on CPU
    c_in: int
    c_out: int
    size: int
    kernel: int
    stride: int = 1
    padding: int = 0
    output_padding: int = 0
    dilation: int = 1
    groups: int = 1
    transposed: bool = False
    bias: bool = False
    quick: bool = False  # part of --quick
    cuda_n: Optional[int] = None  # batch on CUDA (default n * CUDA_SCALE)

    def __post_init__(self):
        conv = "conv_transpose2d" if self.transposed else "conv2d"
        wrong = [op for op in self.ops if op not in ("im2col", "col2im", conv)]
        if wrong:
            raise ValueError(f"shape {self.name}: ops {wrong} do not fit a {'transposed' if self.transposed else 'direct'} layer")

    def batch(self, device):
        if torch.device(device).type == "cuda":
            return self.cuda_n or self.n * CUDA_SCALE
        return self.n

    @property
    def big(self):
        """(channels, size) of the large side: the image of im2col/col2im."""
        if self.transposed:
            k = self.dilation * (self.kernel - 1)
            return self.c_out, (self.size - 1) * self.stride - 2 * self.padding + k + self.output_padding + 1
        return self.c_in, self.size

    @property
    def windows(self):
        """Window positions per dimension on the large side (the small side's size)."""
        size = self.big[1]
        return (size + 2 * self.padding - self.dilation * (self.kernel - 1) - 1) // self.stride + 1

    def flops(self, batch):
        """Forward FLOPs: 2 N C_small (C_big / G) kh kw OH OW, with OH x OW the small side;
        for conv2d that is 2 N C_out (C_in/G) kh kw OH OW."""
        c_small, c_big = (self.c_in, self.c_out) if self.transposed else (self.c_out, self.c_in)
        return 2 * batch * c_small * (c_big // self.groups) * self.kernel**2 * self.windows**2

    def unfold_bytes(self, batch, itemsize):
        """Bytes of the column matrix plus the image, for im2col/col2im."""
        c, size = self.big
        return batch * c * (self.kernel**2 * self.windows**2 + size**2) * itemsize


_UNFOLD = ("conv2d", "im2col", "col2im")
SUITE = [
    # ResNet-like 3x3 layers (stride 1, padding 1)
    Shape("resnet-3x3-64-56", "ResNet conv2_x 3x3, 64->64 at 56x56", _UNFOLD, 8, 64, 64, 56, 3, padding=1),
    Shape("resnet-3x3-128-28", "ResNet conv3_x 3x3, 128->128 at 28x28", _UNFOLD, 8, 128, 128, 28, 3, padding=1),
    Shape("resnet-3x3-256-14", "ResNet conv4_x 3x3, 256->256 at 14x14", _UNFOLD, 8, 256, 256, 14, 3, padding=1, quick=True),
    Shape("resnet-3x3-512-7", "ResNet conv5_x 3x3, 512->512 at 7x7", ("conv2d",), 8, 512, 512, 7, 3, padding=1),
    # strided 3x3 (ResNet's downsampling convs)
    Shape("resnet-3x3-s2-64to128", "ResNet downsampling 3x3 stride 2, 64->128, 56->28", ("conv2d", "im2col"), 8, 64, 128, 56, 3, 2, 1),
    Shape("resnet-3x3-s2-256to512", "ResNet downsampling 3x3 stride 2, 256->512, 14->7", ("conv2d",), 8, 256, 512, 14, 3, 2, 1),
    # the 7x7 stride-2 stem
    Shape("stem-7x7-s2", "ResNet stem 7x7 stride 2 padding 3, 3->64, 224->112", _UNFOLD, 2, 3, 64, 224, 7, 2, 3),
    # 1x1 (bottleneck and projection)
    Shape("1x1-256to64-56", "bottleneck reduce 1x1, 256->64 at 56x56", ("conv2d",), 8, 256, 64, 56, 1),
    Shape("1x1-1024to256-14", "bottleneck reduce 1x1, 1024->256 at 14x14", ("conv2d",), 8, 1024, 256, 14, 1, quick=True),
    Shape("1x1-s2-512to1024-28", "projection shortcut 1x1 stride 2, 512->1024, 28->14", ("conv2d",), 8, 512, 1024, 28, 1, 2),
    # grouped and dilated (torch's thnn_conv2d does not take them: no im2col-kernel column)
    Shape("resnext-3x3-g32-256-28", "ResNeXt grouped 3x3, 256->256, 32 groups, at 28x28", ("conv2d",), 8, 256, 256, 28, 3, padding=1, groups=32),
    Shape("atrous-3x3-d2-256-28", "DeepLab-style atrous 3x3, dilation 2, 256->256 at 28x28", ("conv2d",), 4, 256, 256, 28, 3, padding=2, dilation=2),
    # DCGAN generator: 4x4 stride-2 padding-1 transposed convs
    Shape("dcgan-512to256-4", "DCGAN generator 4x4 s2 p1 transposed, 512->256, 4->8", ("conv_transpose2d", "col2im"), 64, 512, 256, 4, 4, 2, 1, transposed=True),
    Shape("dcgan-256to128-8", "DCGAN generator 4x4 s2 p1 transposed, 256->128, 8->16", ("conv_transpose2d", "col2im"), 64, 256, 128, 8, 4, 2, 1, transposed=True),
    Shape("dcgan-128to64-16", "DCGAN generator 4x4 s2 p1 transposed, 128->64, 16->32", ("conv_transpose2d", "col2im"), 32, 128, 64, 16, 4, 2, 1, transposed=True),
    Shape("dcgan-64to3-32", "DCGAN generator output 4x4 s2 p1 transposed, 64->3, 32->64", ("conv_transpose2d", "im2col", "col2im"), 64, 64, 3, 32, 4, 2, 1, transposed=True, quick=True),
    # U-Net 2x2 stride-2 up-convolutions (with bias, as nn.ConvTranspose2d's default)
    Shape("unet-up-2x2-128to64-32", "U-Net up-conv 2x2 s2 transposed, 128->64, 32->64, bias", ("conv_transpose2d", "col2im"), 8, 128, 64, 32, 2, 2, transposed=True, bias=True, quick=True),
    Shape("unet-up-2x2-512to256-16", "U-Net up-conv 2x2 s2 transposed, 512->256, 16->32, bias", ("conv_transpose2d",), 8, 512, 256, 16, 2, 2, transposed=True, bias=True),
    # autoencoder decoder: 3x3 stride 2 with output_padding
    Shape("decoder-3x3-s2-op1-128to64-28", "decoder 3x3 s2 p1 output_padding 1 transposed, 128->64, 28->56", ("conv_transpose2d",), 8, 128, 64, 28, 3, 2, 1, 1, transposed=True),
]


# ---------------------------------------------------------------- the op table


@dataclass
class Impl:
    label: str  # how the report names it
    fn: Callable  # (shape, tensors) -> output tensor
    skip: Callable = lambda shape: None  # (shape) -> why it does not apply, or None


@dataclass
class Op:
    rate: str  # "GFLOP/s" or "GB/s"
    backward: bool  # benchmarked forward+backward too
    impls: dict = field(default_factory=dict)


def _missing(name):
    return None if hasattr(torch._C._nn, name) else f"torch._C._nn.{name} is not in torch {torch.__version__}"


def _thnn_skip(s):
    reason = _missing("thnn_conv2d")
    if reason is None and s.groups != 1:
        reason = f"thnn_conv2d takes no groups (groups={s.groups})"
    if reason is None and s.dilation != 1:
        reason = f"thnn_conv2d takes no dilation (dilation={s.dilation})"
    return reason


def _slow_transpose_skip(s):
    reason = _missing("slow_conv_transpose2d")
    if reason is None and s.groups != 1:
        reason = f"slow_conv_transpose2d takes no groups (groups={s.groups})"
    return reason


def _unfold_args(s):
    return s.kernel, s.dilation, s.padding, s.stride


def _pair(v):
    return (v, v)


OPS = {
    "im2col": Op("GB/s", False, {
        "convt_ext": Impl("convt_ext.im2col", lambda s, t: convt_ext.im2col(t["x"], *_unfold_args(s))),
        "torch": Impl("F.unfold", lambda s, t: F.unfold(t["x"], *_unfold_args(s))),
    }),
    "col2im": Op("GB/s", False, {
        "convt_ext": Impl("convt_ext.col2im", lambda s, t: convt_ext.col2im(t["x"], s.big[1], *_unfold_args(s))),
        "torch": Impl("F.fold", lambda s, t: F.fold(t["x"], s.big[1], *_unfold_args(s))),
    }),
    "conv2d": Op("GFLOP/s", True, {
        "convt_ext": Impl("convt_ext.conv2d", lambda s, t: convt_ext.conv2d(
            t["x"], t["w"], t["b"], s.stride, s.padding, s.dilation, s.groups)),
        "torch": Impl("F.conv2d", lambda s, t: F.conv2d(t["x"], t["w"], t["b"], s.stride, s.padding, s.dilation, s.groups)),
        "torch_im2col": Impl("thnn_conv2d", lambda s, t: torch._C._nn.thnn_conv2d(
            t["x"], t["w"], _pair(s.kernel), t["b"], _pair(s.stride), _pair(s.padding)), _thnn_skip),
    }),
    "conv_transpose2d": Op("GFLOP/s", True, {
        "convt_ext": Impl("convt_ext.conv_transpose2d", lambda s, t: convt_ext.conv_transpose2d(
            t["x"], t["w"], t["b"], s.stride, s.padding, s.output_padding, s.groups, s.dilation)),
        "torch": Impl("F.conv_transpose2d", lambda s, t: F.conv_transpose2d(
            t["x"], t["w"], t["b"], s.stride, s.padding, s.output_padding, s.groups, s.dilation)),
        "torch_im2col": Impl("slow_conv_transpose2d", lambda s, t: torch._C._nn.slow_conv_transpose2d(
            t["x"], t["w"], _pair(s.kernel), t["b"], _pair(s.stride), _pair(s.padding),
            _pair(s.output_padding), _pair(s.dilation)), _slow_transpose_skip),
    }),
}


def make_inputs(op, s, batch, device, dtype, requires_grad):
    """The tensors of one case: x (image, columns or conv input), w and b
    (None for im2col/col2im). Weights are scaled by 1/sqrt(fan-in)."""
    def randn(*shape, scale=1.0):
        t = (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(dtype)
        return t.requires_grad_(requires_grad)

    c_big, size = s.big
    if op == "im2col":
        return {"x": randn(batch, c_big, size, size), "w": None, "b": None}
    if op == "col2im":
        return {"x": randn(batch, c_big * s.kernel**2, s.windows**2), "w": None, "b": None}
    if s.transposed:
        w_shape = (s.c_in, s.c_out // s.groups, s.kernel, s.kernel)
        fan_in = s.c_in // s.groups * s.kernel**2 / s.stride**2
    else:
        w_shape = (s.c_out, s.c_in // s.groups, s.kernel, s.kernel)
        fan_in = s.c_in // s.groups * s.kernel**2
    return {
        "x": randn(batch, s.c_in, s.size, s.size),
        "w": randn(*w_shape, scale=1 / math.sqrt(max(fan_in, 1))),
        "b": randn(s.c_out) if s.bias else None,
    }


# ------------------------------------------------------------------ measuring


@dataclass(frozen=True)
class Case:
    op: str
    shape: Shape
    direction: str

    @property
    def label(self):
        return f"{self.op} {'fwd' if self.direction == FORWARD else 'fwd+bwd'} {self.shape.name}"


def measure(fn, min_run_time):
    """(median seconds per call, every per-call time) of fn(), by
    torch.utils.benchmark: it warms up, picks a block size and synchronizes
    CUDA. Runs with torch's current thread count (Timer's default is one)."""
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return m.median, list(m.times)


def check(actual, expected, dtype, names):
    """None when every actual tensor is close to its expected one, else a
    one-line description of the first mismatch."""
    rtol, atol = TOLERANCES[dtype]
    for name, a, e in zip(names, actual, expected):
        scale = max(e.detach().abs().max().item(), 1.0) if e.numel() else 1.0
        try:
            torch.testing.assert_close(a, e, rtol=rtol, atol=atol * scale)
        except AssertionError as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            return f"{name}: " + "; ".join(lines[:4])
    return None


def _backend(case, t):
    """The kernel torch's default dispatch picks (Mkldnn, Cudnn, Slow2d, ...)."""
    if case.op not in ("conv2d", "conv_transpose2d") or not hasattr(torch._C, "_select_conv_backend"):
        return None
    s = case.shape
    try:
        b = torch._C._select_conv_backend(
            t["x"], t["w"], t["b"], _pair(s.stride), _pair(s.padding), _pair(s.dilation),
            s.transposed, _pair(s.output_padding), s.groups, None)
    except Exception:  # noqa: BLE001 - private API, informational only
        return None
    members = type(b).__members__
    name = next((k for k, v in members.items() if v == b), None)
    if name is None and "Mkldnn" in members and "MkldnnEmpty" in members:
        # The Python binding leaves out MkldnnTranspose, which sits between these two.
        if members["Mkldnn"].value < b.value < members["MkldnnEmpty"].value:
            name = "MkldnnTranspose"
    return name or f"backend#{b.value}"


def run_case(case, device, dtype, rounds, min_run_time):
    """Check every implementation of one case against torch's default, then
    time those that pass in `rounds` interleaved rounds. Returns a dict (the
    JSON record); status "ok", "FAIL"/"error" when convt_ext is wrong or
    raises, "skipped" when torch's default raises (no reference)."""
    op, s = OPS[case.op], case.shape
    backward = case.direction == BACKWARD
    batch = s.batch(device)
    torch.manual_seed(0)
    t = make_inputs(case.op, s, batch, device, dtype, requires_grad=backward)
    leaves = [v for v in (t["x"], t["w"], t["b"]) if v is not None]
    names = ["grad_input", "grad_weight", "grad_bias"][: len(leaves)] if backward else ["output"]
    record = {
        "op": case.op, "direction": case.direction, "shape": s.name, "batch": batch,
        "torch_backend": _backend(case, t), "status": "ok", "error": None, "impls": {},
        "load_average": _load(),  # other processes on the machine skew timings
    }
    if case.op in ("im2col", "col2im"):
        record["bytes"] = s.unfold_bytes(batch, t["x"].element_size())
    else:
        record["flops"] = s.flops(batch) * (3 if backward else 1)

    def runner(impl):
        if not backward:
            return lambda: impl.fn(s, t)
        # The gradient of sum(output * grad) with respect to input, weight and bias.
        return lambda: torch.autograd.grad(impl.fn(s, t), leaves, grad)

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

    timed = {}
    for key in IMPLS:
        impl = op.impls.get(key)
        if impl is None:
            continue
        entry = record["impls"][key] = {"label": impl.label, "status": "ok", "note": None}
        reason = impl.skip(s)
        if reason:
            entry.update(status="n/a", note=reason)
            continue
        fn = runner(impl)
        try:
            problem = check(as_tuple(fn()), expected, dtype, names)
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            problem, entry["status"] = f"{type(exc).__name__}: {exc}".splitlines()[0], "error"
        if problem is None:
            timed[key] = fn
            continue
        if key == "convt_ext":
            entry["status"] = "error" if entry["status"] == "error" else "FAIL"
            record.update(status=entry["status"], error=problem)
        else:  # torch's internal kernel: unsupported here (no backward, dtype) or off
            entry.update(status="n/a" if entry["status"] == "error" else "mismatch")
        entry["note"] = problem
    if record["status"] != "ok":
        return record  # a wrong result is not timed

    for key in timed:
        record["impls"][key].update(round_median_s=[], round_times_s=[])
    order = list(timed)
    for r in range(rounds):
        for key in order[r % len(order):] + order[: r % len(order)]:  # rotate who goes first
            median, times = measure(timed[key], min_run_time)
            record["impls"][key]["round_median_s"].append(median)
            record["impls"][key]["round_times_s"].append(times)
    for key in timed:
        entry = record["impls"][key]
        entry["median_s"] = statistics.median(entry["round_median_s"])
    ours = record["impls"]["convt_ext"]["round_median_s"]
    record["speedup"] = {}
    for key in timed:
        if key != "convt_ext":
            ratios = [a / b for a, b in zip(record["impls"][key]["round_median_s"], ours)]
            record["speedup"][key] = {"median": statistics.median(ratios), "rounds": ratios}
    return record


def _load():
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def reference_rates(device, quick, min_run_time):
    """sgemm GFLOP/s (torch.mm of two float32 n x n matrices, n = 2048, or 1024
    with --quick) and copy GB/s (dst.copy_(src) of 64 MiB, counting the bytes
    read plus the bytes written). %peak is relative to these whatever the
    benchmark dtype: torch.mm in float16 runs at ~1 GFLOP/s on CPU, no peak."""
    n = 1024 if quick else 2048
    a, b = (torch.randn(n, n, device=device) for _ in range(2))
    c = torch.empty_like(a)
    t_mm, _ = measure(lambda: torch.mm(a, b, out=c), min_run_time)
    src = torch.ones(64 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t_copy, _ = measure(lambda: dst.copy_(src), min_run_time)
    return {
        "gemm_gflops": 2 * n**3 / t_mm / 1e9, "gemm_n": n, "gemm_dtype": "float32",
        "copy_gbps": 2 * src.nbytes / t_copy / 1e9, "copy_bytes": src.nbytes,
    }


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device):
    config = torch.__config__.show()
    onednn = re.search(r"MKL-DNN v([\w.]+)", config)
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: None)(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "mkldnn": {"available": torch.backends.mkldnn.is_available(),
                   "enabled": torch.backends.mkldnn.enabled,
                   "version": onednn.group(1) if onednn else None},
        "convt_ext": convt_ext.build_info(),
        "load_average": _load(),
    }
    if device.type == "cuda":
        info.update(
            gpu=torch.cuda.get_device_name(device),
            cuda=torch.version.cuda,
            cudnn={"available": torch.backends.cudnn.is_available(), "version": torch.backends.cudnn.version(),
                   "benchmark": torch.backends.cudnn.benchmark},
        )
    return info


def _disable_tf32():
    """Full float32 on CUDA for torch and us alike (cuDNN convs default to TF32)."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        conv.fp32_precision = "ieee"
    else:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


# ------------------------------------------------------------------- reporting


def _fmt_x(v):
    return "n/a" if v is None else f"{v:.2f}x"


def _speedup(r, key):
    return r.get("speedup", {}).get(key, {}).get("median")


def _rate(r, reference):
    """(rate, unit, percent of the reference rate) of our median time."""
    t = r["impls"]["convt_ext"].get("median_s")
    if not t:
        return None, "", None
    if "flops" in r:
        rate = r["flops"] / t / 1e9
        return rate, "GFLOP/s", 100 * rate / reference["gemm_gflops"]
    rate = r["bytes"] / t / 1e9
    return rate, "GB/s", 100 * rate / reference["copy_gbps"]


def format_table(results):
    head = ("op", "dir", "shape", "ours ms", "torch ms", "t-im2col ms", "ours rate", "%peak", "vs torch", "vs im2col", "check")
    rows = []
    for r in results:
        ms = []
        for key in IMPLS:
            e = r["impls"].get(key)
            ms.append(f"{e['median_s'] * 1e3:.2f}" if e and "median_s" in e else ("-" if e is None else e["status"]))
        rate, unit, pct = (r["rate"][k] for k in ("value", "unit", "percent_of_reference"))
        rows.append((
            r["op"], "fwd" if r["direction"] == FORWARD else "fwd+bwd", r["shape"], *ms,
            f"{rate:.1f} {unit}" if rate else "-", f"{pct:.0f}%" if pct else "-",
            _fmt_x(_speedup(r, "torch")), "-" if "torch_im2col" not in r["impls"] else _fmt_x(_speedup(r, "torch_im2col")),
            r["status"],
        ))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    left = 3  # op, dir, shape left-aligned; numbers right-aligned
    def line(cells):
        return "  ".join(str(c).ljust(w) if i < left else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(head), line("-" * w for w in widths)] + [line(row) for row in rows]
    for r in results:
        if r["status"] != "ok":
            out.append(f"{r['status']}: {r['op']} {r['direction']} {r['shape']}: {r['error']}")
    return "\n".join(out)


def summarize(results):
    """Per op and direction: median / min / max of the per-shape speedups."""
    summary = []
    for op in OP_NAMES:
        for direction in (FORWARD, BACKWARD):
            group = [r for r in results if r["op"] == op and r["direction"] == direction]
            if not group:
                continue
            entry = {"op": op, "direction": direction, "shapes": len(group),
                     "failures": sum(r["status"] in FAILED for r in group),
                     "skipped": sum(r["status"] == "skipped" for r in group)}
            for key in ("torch", "torch_im2col"):
                values = [v for v in (_speedup(r, key) for r in group) if v is not None]
                if values:
                    entry[f"vs_{key}"] = {"median": statistics.median(values), "min": min(values), "max": max(values),
                                          "geomean": math.exp(statistics.fmean(math.log(v) for v in values)),
                                          "wins": sum(v > 1 for v in values), "shapes": len(values)}
            summary.append(entry)
    return summary


def format_summary(summary):
    out = []
    for e in summary:
        parts = []
        for key, what in (("torch", "torch default"), ("torch_im2col", "torch im2col kernel")):
            v = e.get(f"vs_{key}")
            if v:
                parts.append(f"median {v['median']:.2f}x vs {what} (min {v['min']:.2f}x, max {v['max']:.2f}x, "
                             f"faster on {v['wins']}/{v['shapes']})")
        text = "; ".join(parts) or "nothing timed"
        if e["failures"]:
            text += f"; {e['failures']} FAILED"
        if e["skipped"]:
            text += f"; {e['skipped']} skipped (torch raised)"
        out.append(f"{e['op']} {e['direction']}: {text}")
    return "\n".join(out)


def plot(results, path, title):
    """A PNG of the speedups per case; returns the path, or None without matplotlib."""
    try:
        from matplotlib import ticker
        from matplotlib.figure import Figure
    except ImportError:
        print("note: matplotlib is not installed, so no chart (pip install matplotlib).")
        return None
    timed = [r for r in results if "speedup" in r]
    if not timed:
        return None
    labels = [f"{r['op']} {'fwd' if r['direction'] == FORWARD else 'fwd+bwd'} {r['shape']}" for r in timed]
    fig = Figure(figsize=(9, 1.2 + 0.28 * len(timed)))
    ax = fig.add_subplot()
    ys = range(len(timed))
    for offset, key, label in ((-0.2, "torch", "vs torch default"), (0.2, "torch_im2col", "vs torch im2col kernel")):
        vals = [_speedup(r, key) or float("nan") for r in timed]
        # bars grow from 1 (parity): right where convt_ext is faster, left where slower
        bars = ax.barh([y + offset for y in ys], [v - 1 for v in vals], left=1, height=0.4, label=label)
        ax.bar_label(bars, labels=["" if math.isnan(v) else f"{v:.2f}" for v in vals], fontsize=6, padding=2)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_yticks(list(ys), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup of convt_ext (torch time / convt_ext time; > 1: convt_ext faster)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def default_out(device_type):
    """benchmarks/results/<device>-<stamp>.json in a repo checkout, else ./convt_ext-bench-<device>.json."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for root in (Path(__file__).resolve().parents[1], Path.cwd()):
        folder = root / "benchmarks" / "results"
        if folder.is_dir():
            return folder / f"{device_type}-{stamp}.json"
    return Path.cwd() / f"convt_ext-bench-{device_type}.json"


# ------------------------------------------------------------------------ main


def select_cases(ops, shape_filters, quick, backward):
    cases = []
    for op in ops:
        for s in SUITE:
            if op not in s.ops or (quick and not s.quick):
                continue
            if shape_filters and not any(f in s.name for f in shape_filters):
                continue
            cases.append(Case(op, s, FORWARD))
            if backward and OPS[op].backward:
                cases.append(Case(op, s, BACKWARD))
    return cases


def _progress(cases):
    """Yields the cases with a tqdm bar on stderr, or plain progress lines."""
    try:
        from tqdm import tqdm
    except ImportError:
        for i, case in enumerate(cases, 1):
            print(f"[{i}/{len(cases)}] {case.label}", file=sys.stderr, flush=True)
            yield case
        return
    with tqdm(cases, unit="case", file=sys.stderr, dynamic_ncols=True) as bar:
        for case in bar:
            bar.set_postfix_str(case.label)
            yield case


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m convt_ext.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--ops", default=",".join(OP_NAMES), help=f"comma list from {','.join(OP_NAMES)}")
    p.add_argument("--shapes", help="comma list of substrings; run the shapes whose name contains one")
    p.add_argument("--quick", action="store_true", help="a few small shapes, 1 round, 1024^2 GEMM reference")
    p.add_argument("--rounds", type=int, help="interleaved rounds per case (default 3, 1 with --quick)")
    p.add_argument("--min-run-time", type=float, help="seconds per blocked_autorange (default 0.3, 0.05 with --quick)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's, all cores)")
    p.add_argument("--no-backward", action="store_true", help="forward only")
    p.add_argument("--out", type=Path, help="JSON path (the PNG goes next to it)")
    p.add_argument("--list", action="store_true", help="print the suite and exit")
    args = p.parse_args(argv)
    args.ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in args.ops if o not in OP_NAMES]
    if unknown or not args.ops:
        p.error(f"--ops: unknown {unknown}; choose from {','.join(OP_NAMES)}")
    args.shapes = [f.strip() for f in args.shapes.split(",") if f.strip()] if args.shapes else []
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.min_run_time = args.min_run_time or (0.05 if args.quick else 0.3)
    if args.rounds < 1 or args.min_run_time <= 0 or (args.threads is not None and args.threads < 1):
        p.error("--rounds, --min-run-time and --threads must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.list:
        for s in SUITE:
            print(f"{s.name:32} {','.join(s.ops):34} {'quick ' if s.quick else ''}{s.description}")
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    cases = select_cases(args.ops, args.shapes, args.quick, not args.no_backward)
    if not cases:
        print(f"error: no case matches --ops {','.join(args.ops)} --shapes {','.join(args.shapes)}"
              f"{' --quick' if args.quick else ''} (see --list)", file=sys.stderr)
        return 2

    started = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.set_device(device)
        _disable_tf32()
    machine = machine_info(device)
    if device.type == "cuda":
        default = f"cuDNN {machine['cudnn']['version']} (torch's default; TF32 off for both)"
    else:
        default = f"oneDNN {machine['mkldnn']['version']} where torch's dispatch picks it (see torch_backend in the JSON)"
    print(f"convt_ext {convt_ext.__version__} vs torch {torch.__version__} on {device} "
          f"({machine.get('gpu') or machine['cpu']}, {args.dtype}, {torch.get_num_threads()} threads); "
          f"torch default = {default}")
    ref_start = reference_rates(device, args.quick, args.min_run_time)
    print(f"reference: GEMM {ref_start['gemm_gflops']:.1f} GFLOP/s ({ref_start['gemm_n']}^2 {ref_start['gemm_dtype']}), "
          f"copy {ref_start['copy_gbps']:.1f} GB/s; {len(cases)} cases x {args.rounds} rounds")

    results = [run_case(c, device, dtype, args.rounds, args.min_run_time) for c in _progress(cases)]

    ref_end = reference_rates(device, args.quick, args.min_run_time)
    reference = {
        "gemm_gflops": max(ref_start["gemm_gflops"], ref_end["gemm_gflops"]),
        "copy_gbps": max(ref_start["copy_gbps"], ref_end["copy_gbps"]),
        "start": ref_start, "end": ref_end,
    }
    for r in results:
        rate, unit, pct = _rate(r, reference)
        r["rate"] = {"value": rate, "unit": unit, "percent_of_reference": pct}
    table = format_table(results)
    summary = summarize(results)
    failures = sum(r["status"] in FAILED for r in results)
    print()
    print(table)
    print()
    print(f"reference (best of start/end): GEMM {reference['gemm_gflops']:.1f} GFLOP/s "
          f"(start {ref_start['gemm_gflops']:.1f}, end {ref_end['gemm_gflops']:.1f}), copy {reference['copy_gbps']:.1f} GB/s")
    print("speedup = torch time / convt_ext time (> 1: convt_ext faster); median over shapes of the per-round medians:")
    print(format_summary(summary))

    out = args.out or default_out(device.type)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "schema": 1,
        "command": ["python", "-m", "convt_ext.bench", *(sys.argv[1:] if argv is None else argv)],
        "settings": {
            "device": str(device), "dtype": args.dtype, "ops": args.ops, "shapes": args.shapes, "quick": args.quick,
            "rounds": args.rounds, "min_run_time_s": args.min_run_time, "backward": not args.no_backward,
            "cuda_scale": CUDA_SCALE, "tolerances": {"rtol": TOLERANCES[dtype][0], "atol_x_max_abs": TOLERANCES[dtype][1]},
            "tf32": False if device.type == "cuda" else None,
        },
        "machine": machine,
        "reference": reference,
        "suite": [asdict(s) for s in SUITE],
        "results": results,
        "summary": summary,
        "failures": failures,
        "elapsed_s": time.perf_counter() - started,
    }
    out.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {out}")
    title = (f"convt_ext vs torch {torch.__version__}, {machine.get('gpu') or machine['cpu']}, "
             f"{torch.get_num_threads()} threads, {args.dtype}, {machine['date'][:10]}")
    chart = plot(results, out.with_suffix(".png"), title)
    if chart:
        print(f"wrote {chart}")
    if failures:
        print(f"{failures} case(s) FAILED the check against torch", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
