"""Benchmark convt_ext against PyTorch's own kernels.

    python -m convt_ext.bench                 # the full suite (CUDA when available)
    python -m convt_ext.bench --quick         # a few small shapes, one round (about 1 min on 2 CPU cores)
    python -m convt_ext.bench --ops conv_transpose2d --shapes dcgan --dtype bfloat16
    python -m convt_ext.bench --dims 1,3      # only the 1-d (audio) and 3-d (video, volume) shapes

For every case (op x shape x direction) each implementation is first checked
against torch's default kernel (torch.testing.assert_close), then timed with
torch.utils.benchmark.Timer.blocked_autorange, ours and torch's interleaved
over R rounds. Each figure is the median over rounds; speedups are the median
of per-round ratios torch_time / our_time (> 1: convt_ext is faster).

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

Ceilings: a convolution's GFLOP/s is compared with the machine's measured fp32
peak, the best GEMM rate among torch's engines (MKL's torch.mm and oneDNN's
linear on CPU, cuBLAS on CUDA) over a few shapes; im2col/col2im's GB/s with the
copy bandwidth. The report (terminal table, summary, JSON, PNG chart) is built
from the list of results only; see benchmarks/README.md.
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
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch.utils import benchmark

import convt_ext

UNFOLD_OPS = ("im2col", "col2im")
CONV_OPS = ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
OP_NAMES = UNFOLD_OPS + CONV_OPS
DIMS = (1, 2, 3)
FORWARD, BACKWARD = "forward", "forward+backward"
IMPLS = ("convt_ext", "torch", "torch_im2col", "unfoldNd")  # also the order of the first round
COLUMNS = {"convt_ext": "ours", "torch": "torch", "torch_im2col": "t-im2col", "unfoldNd": "unfoldNd"}
FAILED = ("FAIL", "error")  # case statuses that make the exit status 1
NOT_BUILT = "not built"  # the installed convt_ext lacks the op (or its 1-d/3-d form): skipped, not failed
SLOW_CALL_S = 2.0  # a comparator whose checked call takes longer is timed by that one call, not in rounds
CUDA_SCALE = 8  # CUDA batch = CPU batch x CUDA_SCALE unless a shape says otherwise
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
GEMM_SHAPES = {
    "cpu": ((1024, 1024, 1024), (2048, 2048, 2048), (4096, 1024, 1024), (3136, 576, 256)),
    "cpu-quick": ((1024, 1024, 1024), (3136, 576, 256)),
    "cuda": ((4096, 4096, 4096), (8192, 8192, 8192), (16384, 2304, 512)),
    "cuda-quick": ((4096, 4096, 4096),),
}
# Between cases, every PROBE_EVERY_S seconds, the ceilings are sampled again on one shape
# (PROBE_RUN_TIME_S of blocks per engine), so that a busy moment at the start or end does
# not set them.
PROBE_SHAPES = {"cpu": (1024, 1024, 1024), "cuda": (4096, 4096, 4096)}
PROBE_EVERY_S = 10.0
PROBE_RUN_TIME_S = 0.05
CPU_FLAGS = ("avx2", "avx512f", "fma")


def _prod(values):
    return math.prod(values)


# ---------------------------------------------------------------------- suite


@dataclass(frozen=True)
class Shape:
    """One layer of a network, benchmarked for the ops in `ops`.

    A direct layer (transposed=False) maps (n, c_in, *size) to c_out channels
    with conv{dims}d; a transposed layer maps its (small) input (n, c_in, *size)
    to c_out channels of a larger output with conv_transpose{dims}d. dims is 1
    (audio: (N, C, L)), 2 (images) or 3 (video, volumes: (N, C, D, H, W)); size,
    kernel, stride, padding, output_padding and dilation are an int (the same
    in every dimension) or a tuple of dims ints. im2col/col2im use the layer's
    window geometry on its large side (a conv's input, a transposed conv's
    output): the columns hold one window per element of the small side.
    """

    name: str
    description: str
    ops: tuple
    n: int  # batch on CPU
    c_in: int
    c_out: int
    size: Union[int, tuple]
    kernel: Union[int, tuple]
    stride: Union[int, tuple] = 1
    padding: Union[int, tuple] = 0
    output_padding: Union[int, tuple] = 0
    dilation: Union[int, tuple] = 1
    groups: int = 1
    transposed: bool = False
    bias: bool = False
    quick: bool = False  # part of --quick
    cuda_n: Optional[int] = None  # batch on CUDA (default n * CUDA_SCALE)
    dims: int = 2

    def __post_init__(self):
        if self.dims not in DIMS:
            raise ValueError(f"shape {self.name}: dims must be 1, 2 or 3, not {self.dims}")
        for name in ("size", "kernel", "stride", "padding", "output_padding", "dilation"):
            v = getattr(self, name)
            if isinstance(v, tuple) and len(v) != self.dims:
                raise ValueError(f"shape {self.name}: {name}={v} is not {self.dims}-d")
        wrong = [op for op in self.ops if op not in (*UNFOLD_OPS, self.conv)]
        if wrong:
            raise ValueError(f"shape {self.name}: ops {wrong} do not fit a {self.dims}-d "
                             f"{'transposed' if self.transposed else 'direct'} layer")
        if self.c_in % self.groups or self.c_out % self.groups:
            raise ValueError(f"shape {self.name}: groups={self.groups} divides neither c_in nor c_out")

    def _t(self, v):
        return tuple(v) if isinstance(v, tuple) else (v,) * self.dims

    @property
    def conv(self):
        """The convolution op of this layer: conv{dims}d or conv_transpose{dims}d."""
        return f"conv_transpose{self.dims}d" if self.transposed else f"conv{self.dims}d"

    sizes = property(lambda self: self._t(self.size))
    kernels = property(lambda self: self._t(self.kernel))
    strides = property(lambda self: self._t(self.stride))
    paddings = property(lambda self: self._t(self.padding))
    output_paddings = property(lambda self: self._t(self.output_padding))
    dilations = property(lambda self: self._t(self.dilation))

    def batch(self, device):
        if torch.device(device).type == "cuda":
            return self.cuda_n or self.n * CUDA_SCALE
        return self.n

    @property
    def big(self):
        """(channels, sizes) of the large side: the image of im2col/col2im."""
        if self.transposed:
            return self.c_out, tuple(
                (i - 1) * s - 2 * p + d * (k - 1) + op + 1
                for i, s, p, d, k, op in zip(self.sizes, self.strides, self.paddings, self.dilations, self.kernels,
                                             self.output_paddings))
        return self.c_in, self.sizes

    @property
    def windows(self):
        """Window positions per dimension on the large side (the small side's sizes)."""
        return tuple((i + 2 * p - d * (k - 1) - 1) // s + 1
                     for i, s, p, d, k in zip(self.big[1], self.strides, self.paddings, self.dilations, self.kernels))

    def flops(self, batch):
        """Forward FLOPs: 2 N C_small (C_big / G) prod(kernel) prod(small side);
        for a direct conv that is 2 N C_out (C_in/G) kh kw OH OW in 2-d."""
        c_small, c_big = (self.c_in, self.c_out) if self.transposed else (self.c_out, self.c_in)
        return 2 * batch * c_small * (c_big // self.groups) * _prod(self.kernels) * _prod(self.windows)

    def unfold_bytes(self, batch, itemsize):
        """Bytes of the column matrix plus the image, for im2col/col2im."""
        c, sizes = self.big
        return batch * c * (_prod(self.kernels) * _prod(self.windows) + _prod(sizes)) * itemsize


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
    # 1-d (audio): (N, C, L)
    Shape("audio-1d-k3-64-16000", "1-d 3-tap conv, 64->64 over 1 s of 16 kHz audio", ("conv1d", "im2col", "col2im"), 4, 64, 64, 16000, 3, padding=1, dims=1),
    Shape("audio-1d-k3-64-4096", "1-d 3-tap conv, 64->64 over 4096 samples", ("conv1d", "im2col", "col2im"), 8, 64, 64, 4096, 3, padding=1, dims=1, quick=True),
    Shape("upsample-1d-k4-s2-128to64-4000", "1-d upsampler 4-tap s2 p1 transposed, 128->64, 4000->8000", ("conv_transpose1d", "col2im"), 4, 128, 64, 4000, 4, 2, 1, transposed=True, dims=1, quick=True),
    Shape("hifigan-1d-k16-s8-512to256-64", "HiFi-GAN first upsampler 16-tap s8 p4 transposed, 512->256, 64->512", ("conv_transpose1d",), 16, 512, 256, 64, 16, 8, 4, transposed=True, dims=1),
    # 3-d (video, medical volumes): (N, C, D, H, W)
    Shape("video-3x3x3-32-16x32x32", "3-d 3x3x3 conv, 32->32 on 16x32x32 (C3D/3-d U-Net style)", ("conv3d", "im2col", "col2im"), 2, 32, 32, (16, 32, 32), 3, padding=1, dims=3),
    Shape("volume-3x3x3-s2-32to64-32", "3-d downsampling 3x3x3 stride 2, 32->64, 32^3->16^3", ("conv3d", "im2col"), 2, 32, 64, 32, 3, 2, 1, dims=3),
    Shape("p3d-1x3x3-64-8x28x28", "3-d (1,3,3) spatial conv of a (2+1)-d block, 64->64 on 8x28x28", ("conv3d", "im2col"), 4, 64, 64, (8, 28, 28), (1, 3, 3), padding=(0, 1, 1), dims=3, quick=True),
    Shape("unet3d-up-2x2x2-64to32-8x16x16", "3-d U-Net up-conv 2x2x2 s2 transposed, 64->32, 8x16x16->16x32x32, bias", ("conv_transpose3d", "col2im"), 8, 64, 32, (8, 16, 16), 2, 2, transposed=True, bias=True, dims=3, quick=True),
]


# ---------------------------------------------------------------- the op table


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
    backward: bool  # benchmarked forward+backward too
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


def _conv_fn(module):
    """(shape, tensors) -> module's conv{d}d / conv_transpose{d}d of the layer (F or convt_ext)."""
    def fn(s, t):
        conv = getattr(module, s.conv)
        if s.transposed:
            return conv(t["x"], t["w"], t["b"], s.stride, s.padding, s.output_padding, s.groups, s.dilation)
        return conv(t["x"], t["w"], t["b"], s.stride, s.padding, s.dilation, s.groups)
    return fn


def _unfold_args(s):
    return s.kernels, s.dilations, s.paddings, s.strides


def _onehot(s, device, dtype):
    """Kernels (C*K, 1, *kernel) of a grouped conv that copies tap j of channel c to output
    channel c*K + j: im2col's row order, so the conv is im2col and its adjoint col2im."""
    c, k = s.big[0], _prod(s.kernels)
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
    return v.reshape(n, c * _prod(s.kernels), -1)


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
    # both ends, so the last (size + 2p - d(k-1) - 1) mod stride elements need output_padding
    # (always < stride, as torch requires).
    cols = x.reshape(x.shape[0], c * _prod(s.kernels), *s.windows)
    output_padding = [(i + 2 * p - d * (k - 1) - 1) % st
                      for i, p, d, k, st in zip(sizes, s.paddings, s.dilations, s.kernels, s.strides)]
    return F.conv_transpose3d(cols, t["onehot"], None, s.strides, s.paddings, output_padding, c, s.dilations)


def _torch_unfold_label(op):
    def label(s):
        if s.dims == 3:
            return "Tensor.unfold" if op == "im2col" else "F.conv_transpose3d one-hot"
        return ("F.unfold" if op == "im2col" else "F.fold") + (" (as 2-d)" if s.dims == 1 else "")
    return label


def _unfoldnd():
    try:
        import unfoldNd
    except ImportError:
        return None
    return unfoldNd


def _unfoldnd_skip(s):
    return None if _unfoldnd() is not None else "unfoldNd is not installed (pip install unfoldNd)"


OPS = {
    "im2col": Op("GB/s", False, {
        "convt_ext": Impl("convt_ext.im2col", lambda s, t: convt_ext.im2col(t["x"], *_unfold_args(s))),
        "torch": Impl(_torch_unfold_label("im2col"), _torch_im2col),
        "unfoldNd": Impl("unfoldNd.unfoldNd", lambda s, t: _unfoldnd().unfoldNd(t["x"], *_unfold_args(s)), _unfoldnd_skip),
    }),
    "col2im": Op("GB/s", False, {
        "convt_ext": Impl("convt_ext.col2im", lambda s, t: convt_ext.col2im(t["x"], s.big[1], *_unfold_args(s))),
        "torch": Impl(_torch_unfold_label("col2im"), _torch_col2im),
        "unfoldNd": Impl("unfoldNd.foldNd", lambda s, t: _unfoldnd().foldNd(t["x"], s.big[1], *_unfold_args(s)), _unfoldnd_skip),
    }),
}
for _op in CONV_OPS:
    OPS[_op] = Op("GFLOP/s", True, {
        "convt_ext": Impl(f"convt_ext.{_op}", _conv_fn(convt_ext)),
        "torch": Impl(f"F.{_op}", _conv_fn(F)),
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
        x = randn(batch, c_big, *sizes) if op == "im2col" else randn(batch, c_big * _prod(s.kernels), _prod(s.windows))
        onehot = _onehot(s, device, dtype) if s.dims == 3 and op == "col2im" else None
        return {"x": x, "w": None, "b": None, "onehot": onehot}
    taps = _prod(s.kernels)
    if s.transposed:
        w_shape = (s.c_in, s.c_out // s.groups, *s.kernels)
        fan_in = s.c_in // s.groups * taps / _prod(s.strides)
    else:
        w_shape = (s.c_out, s.c_in // s.groups, *s.kernels)
        fan_in = s.c_in // s.groups * taps
    return {
        "x": randn(batch, s.c_in, *s.sizes),
        "w": randn(*w_shape, scale=1 / math.sqrt(max(fan_in, 1))),
        "b": randn(s.c_out) if s.bias else None,
    }


# ------------------------------------------------------------------ measuring


def op_label(op, dims):
    """im2col/col2im are one op for every dims: "im2col" (2-d), "im2col-1d", "im2col-3d"."""
    return f"{op}-{dims}d" if op in UNFOLD_OPS and dims != 2 else op


@dataclass(frozen=True)
class Case:
    op: str
    shape: Shape
    direction: str

    @property
    def label(self):
        return f"{op_label(self.op, self.shape.dims)} {'fwd' if self.direction == FORWARD else 'fwd+bwd'} {self.shape.name}"


def measure(fn, min_run_time):
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


def run_case(case, device, dtype, rounds, min_run_time, channels_last=False):
    """Check every implementation of one case against torch's default, then
    time those that pass in `rounds` interleaved rounds. Returns a dict (the
    JSON record); status "ok", "FAIL"/"error" when convt_ext is wrong or
    raises, "skipped" when torch's default raises (no reference), "not built"
    when the convt_ext in use lacks the op or its 1-d/3-d form."""
    op, s = OPS[case.op], case.shape
    backward = case.direction == BACKWARD
    batch = s.batch(device)
    record = {
        "op": case.op, "dims": s.dims, "direction": case.direction, "shape": s.name, "batch": batch,
        "torch_backend": None, "status": "ok", "error": None, "impls": {},
        "load_average": _load(),  # other processes on the machine skew timings
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

    timed, once = {}, {}
    for key in IMPLS:
        impl = op.impls.get(key)
        if impl is None:
            continue
        entry = record["impls"][key] = {"label": impl.name(s), "status": "ok", "note": None}
        reason = impl.skip(s)
        if reason:
            entry.update(status="n/a", note=reason)
            continue
        fn = runner(impl)
        try:
            begun = time.perf_counter()
            got = as_tuple(fn())
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - begun
            problem = check(got, expected, dtype, names)
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
            median, times = measure(timed[key], min_run_time)
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
        record["out_round_median_s"] = [measure(again, min_run_time)[0] for _ in range(rounds)]
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


def _load():
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def gemm_engines(device):
    """{name: (what it calls, fn(a, b, b_t, c))}: the GEMMs torch has on this device.
    On CPU: torch.mm (MKL in the usual builds) and oneDNN's linear; on CUDA: cuBLAS."""
    def mm(a, b, bt, c):
        return torch.mm(a, b, out=c)

    if device.type == "cuda":
        return {"cuBLAS": ("torch.mm", mm)}
    engines = {("MKL" if torch.backends.mkl.is_available() else "BLAS"): ("torch.mm", mm)}
    if torch.backends.mkldnn.is_available():
        def onednn(a, b, bt, c):
            return torch.ops.mkldnn._linear_pointwise(a, bt, None, "none", [], "")
        engines["oneDNN"] = ('torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")', onednn)
    return engines


def reference_rates(device, quick, min_run_time, probe=False):
    """The ceilings, measured: the fp32 peak (the best GFLOP/s of every GEMM
    engine on every shape of GEMM_SHAPES: whatever the hardware's FMA units
    reach through the best code torch has) and the copy bandwidth
    (dst.copy_(src) of 64 MiB, counting the bytes read plus the bytes
    written). A ceiling is what the machine reaches at best, so each rate
    comes from the fastest timed block (at least 0.2 s of blocks each), not
    the median: on a shared machine a descheduled thread would otherwise
    lower the ceiling below what convolutions reach. Always float32, whatever
    the benchmark dtype: torch.mm in float16 runs at ~1 GFLOP/s on CPU, no peak.
    probe=True: a short sample between cases, on PROBE_SHAPES only."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    if probe:
        shapes, min_run_time = (PROBE_SHAPES[kind],), PROBE_RUN_TIME_S
    else:
        shapes, min_run_time = GEMM_SHAPES[kind + ("-quick" if quick else "")], max(min_run_time, 0.2)
    gemm = []
    for m, k, n in shapes:
        a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
        bt, c = b.t().contiguous(), torch.empty(m, n, device=device)
        for engine, (call, fn) in gemm_engines(device).items():
            entry = {"engine": engine, "call": call, "m": m, "k": k, "n": n}
            try:
                if not probe:
                    err = (fn(a, b, bt, c) - a @ b).abs().max().item() / max((a @ b).abs().max().item(), 1.0)
                    if not err < 1e-3:
                        raise RuntimeError(f"wrong product (relative error {err:.1e})")
                _, times = measure(lambda: fn(a, b, bt, c), min_run_time)
                entry["gflops"] = 2 * m * k * n / min(times) / 1e9
            except Exception as exc:  # noqa: BLE001 - an engine this build lacks: left out of the peak
                entry["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            gemm.append(entry)
        del a, b, bt, c
    src = torch.ones(64 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    _, times = measure(lambda: dst.copy_(src), min_run_time)
    best = max((g for g in gemm if "gflops" in g), key=lambda g: g["gflops"])
    return {
        "peak_gflops": best["gflops"], "peak_engine": best["engine"], "peak_shape": [best["m"], best["k"], best["n"]],
        "gemm": gemm, "gemm_dtype": "float32", "statistic": "fastest block",
        "copy_gbps": 2 * src.nbytes / min(times) / 1e9, "copy_bytes": src.nbytes,
    }


def combine_references(start, end, probes, machine):
    """The ceilings of the run: for every engine and shape the best of its
    measurements at the start, at the end and (PROBE_SHAPES) between cases;
    the peak is their max, the copy bandwidth the max of all its measurements.
    On a shared machine the load of other processes comes and goes, and a
    ceiling taken at a busy moment would sit below what the cases reached."""
    table = {}
    for when, ref in [("start", start), ("end", end)] + [("during", p) for p in probes]:
        for g in ref["gemm"]:
            entry = table.setdefault((g["engine"], g["m"], g["k"], g["n"]), {
                "engine": g["engine"], "call": g["call"], "m": g["m"], "k": g["k"], "n": g["n"],
                "gflops": None, "start": None, "end": None, "during": None})
            if "gflops" in g:
                entry[when] = max(entry[when] or 0.0, g["gflops"])
                entry["gflops"] = max(entry["gflops"] or 0.0, g["gflops"])
            elif entry["gflops"] is None:
                entry["error"] = g.get("error")
    gemm = list(table.values())
    for g in gemm:
        if g["gflops"] is not None:
            g.pop("error", None)
    best = max((g for g in gemm if g["gflops"]), key=lambda g: g["gflops"])
    engines = {}
    for g in gemm:
        if g["gflops"] and g["gflops"] > engines.get(g["engine"], 0):
            engines[g["engine"]] = g["gflops"]
    copies = [ref["copy_gbps"] for ref in (start, end, *probes)]
    return {
        "peak_gflops": best["gflops"], "peak_engine": best["engine"], "peak_shape": [best["m"], best["k"], best["n"]],
        "peak_by_engine": engines, "gemm": gemm, "gemm_dtype": "float32", "statistic": "fastest block",
        "copy_gbps": max(copies), "copy_bytes": start["copy_bytes"],
        "cpu_capability": machine.get("cpu_capability"), "cpu_flags": machine.get("cpu_flags"),
        "start": start, "end": end, "probes": probes,
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


def cpu_flags():
    """{avx2, avx512f, fma: bool} and the list of avx512* flags, from /proc/cpuinfo (None elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return None
    if flags is None:
        return None
    info = {flag: flag in flags for flag in CPU_FLAGS}
    info["avx512"] = sorted(f for f in set(flags) if f.startswith("avx512"))
    return info


def _describe_flags(flags):
    if not flags:
        return "CPU flags unknown"
    have = [f for f in CPU_FLAGS if flags[f]]
    lack = [f for f in CPU_FLAGS if not flags[f]]
    return " ".join(have) + (f", no {' '.join(lack)}" if lack else "")


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
        "cpu_flags": cpu_flags(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "mkl": torch.backends.mkl.is_available(),
        "mkldnn": {"available": torch.backends.mkldnn.is_available(),
                   "enabled": torch.backends.mkldnn.enabled,
                   "version": onednn.group(1) if onednn else None},
        "unfoldNd": getattr(_unfoldnd(), "__version__", "installed") if _unfoldnd() is not None else None,
        "convt_ext": convt_ext.build_info(),
        "load_average": _load(),
    }
    if device.type == "cuda":
        info.update(
            gpu=torch.cuda.get_device_name(device),
            gpu_capability=".".join(map(str, torch.cuda.get_device_capability(device))),
            gpu_state=_nvidia_smi(device.index if device.index is not None else torch.cuda.current_device()),
            cuda=torch.version.cuda,
            cudnn={"available": torch.backends.cudnn.is_available(), "version": torch.backends.cudnn.version(),
                   "benchmark": torch.backends.cudnn.benchmark},
        )
    return info


def _nvidia_smi(index):
    """The GPU's driver and clocks (SM and memory, now and at most), from
    nvidia-smi; None where it cannot be run."""
    fields = ["driver_version", "clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem", "power.limit"]
    try:
        done = subprocess.run(
            ["nvidia-smi", f"--id={index}", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    values = [v.strip() for v in done.stdout.strip().split(",")]
    return dict(zip(fields, values)) if done.returncode == 0 and len(values) == len(fields) else None


def _set_tf32(on):
    """TF32 on or off for both sides on CUDA: torch's convolutions (cuDNN) and
    convt_ext's GEMMs follow the convolution flag (Note [TF32 as a convolution]
    in csrc/gemm.h); the matmul flag is set alike, so that the GEMM-rate
    ceiling is measured under the same arithmetic. Returns what each side
    then uses, read back from torch. The allow_tf32 flags set cuDNN's conv
    and RNN settings together; torch refuses to read them back after the
    newer per-op API has set the two apart."""
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on
    conv = torch.backends.cudnn.allow_tf32
    return {"torch_cudnn": conv, "convt_ext": conv, "matmul_ceiling": torch.backends.cuda.matmul.allow_tf32}


# ------------------------------------------------------------------- reporting


def _fmt_x(v):
    return "n/a" if v is None else f"{v:.2f}x"


def _speedup(r, key):
    return r.get("speedup", {}).get(key, {}).get("median")


def add_rates(r, reference):
    """Every timed implementation's rate and its share of the ceiling: GFLOP/s
    over the fp32 peak for convolutions, GB/s over the copy bandwidth for
    im2col/col2im. Sets r["rate"] (ours, plus every implementation under "impls")."""
    conv = "flops" in r
    ceiling = reference["peak_gflops"] if conv else reference["copy_gbps"]
    work = r["flops"] if conv else r["bytes"]
    by_impl = {}
    for key, e in r["impls"].items():
        if e.get("median_s"):
            rate = work / e["median_s"] / 1e9
            by_impl[key] = {"value": rate, "percent_of_ceiling": 100 * rate / ceiling}
    if r.get("out_median_s"):  # ours into a reused buffer (out=)
        rate = work / r["out_median_s"] / 1e9
        by_impl["convt_ext_out"] = {"value": rate, "percent_of_ceiling": 100 * rate / ceiling}
    ours = by_impl.get("convt_ext", {})
    r["rate"] = {
        "unit": "GFLOP/s" if conv else "GB/s",
        "ceiling": "peak_gflops" if conv else "copy_gbps", "ceiling_value": ceiling,
        "value": ours.get("value"), "percent_of_ceiling": ours.get("percent_of_ceiling"),
        "impls": by_impl,
    }
    return r


def _pct(r, key):
    return r.get("rate", {}).get("impls", {}).get(key, {}).get("percent_of_ceiling")


def format_table(results):
    present = [k for k in IMPLS if any(k in r["impls"] for r in results)] or ["convt_ext", "torch"]
    comparators = [k for k in present if k != "convt_ext"]
    head = ("op", "dir", "shape", *(f"{COLUMNS[k]} ms" for k in present), "ours rate", "%peak", "torch %peak",
            *(f"vs {COLUMNS[k]}" for k in comparators), "check")
    rows = []
    for r in results:
        ms = []
        for key in present:
            e = r["impls"].get(key)
            if e and "median_s" in e:
                ms.append(f"{e['median_s'] * 1e3:.2f}{'*' if e.get('timed_once') else ''}")
            else:
                ms.append("-" if e is None else e["status"])
        rate = r.get("rate", {})
        value, unit = rate.get("value"), rate.get("unit", "")
        pcts = [_pct(r, k) for k in ("convt_ext", "torch")]
        rows.append((
            op_label(r["op"], r.get("dims", 2)), "fwd" if r["direction"] == FORWARD else "fwd+bwd", r["shape"], *ms,
            f"{value:.1f} {unit}" if value else "-", *(f"{p:.0f}%" if p else "-" for p in pcts),
            *("-" if k not in r["impls"] else _fmt_x(_speedup(r, k)) for k in comparators),
            r["status"],
        ))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    left = 3  # op, dir, shape left-aligned; numbers right-aligned

    def line(cells):
        return "  ".join(str(c).ljust(w) if i < left else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(head), line("-" * w for w in widths)] + [line(row) for row in rows]
    if any(e.get("timed_once") for r in results for e in r["impls"].values()):
        out.append(f"*: one call took over {SLOW_CALL_S:g} s, so that call is its time (not timed in rounds)")
    unbuilt = {}
    for r in results:
        label = op_label(r["op"], r.get("dims", 2))
        if r["status"] == NOT_BUILT:  # one line per op: every shape has the same reason
            unbuilt.setdefault(label, r["error"])
        elif r["status"] != "ok":
            out.append(f"{r['status']}: {label} {r['direction']} {r['shape']}: {r['error']}")
    out += [f"{NOT_BUILT}: {label}: {reason}" for label, reason in unbuilt.items()]
    return "\n".join(out)


def _stats(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(results):
    """Per op, dims and direction: median / min / max of the per-shape speedups,
    and of the rates and their share of the ceiling (the fp32 peak for convolutions)."""
    summary = []
    for op in OP_NAMES:
        for dims in DIMS:
            for direction in (FORWARD, BACKWARD):
                group = [r for r in results if r["op"] == op and r.get("dims", 2) == dims and r["direction"] == direction]
                if not group:
                    continue
                entry = {"op": op, "dims": dims, "label": op_label(op, dims), "direction": direction, "shapes": len(group),
                         "failures": sum(r["status"] in FAILED for r in group),
                         "skipped": sum(r["status"] == "skipped" for r in group),
                         "not_built": sum(r["status"] == NOT_BUILT for r in group)}
                for key in IMPLS[1:]:
                    values = [v for v in (_speedup(r, key) for r in group) if v is not None]
                    if values:
                        entry[f"vs_{key}"] = {**_stats(values),
                                              "geomean": math.exp(statistics.fmean(math.log(v) for v in values)),
                                              "wins": sum(v > 1 for v in values), "shapes": len(values)}
                rates = {}
                for key in ("convt_ext", "convt_ext_out", "torch"):
                    timed = [r["rate"]["impls"][key] for r in group if key in r.get("rate", {}).get("impls", {})]
                    if timed:
                        rates[key] = {"value": _stats([e["value"] for e in timed]),
                                      "percent_of_ceiling": _stats([e["percent_of_ceiling"] for e in timed])}
                if rates:
                    entry["rate"] = {"unit": OPS[op].rate,
                                     "ceiling": "peak_gflops" if op in CONV_OPS else "copy_gbps", **rates}
                summary.append(entry)
    return summary


# The targets the project's issues set, checked on every run (pass / miss /
# not run): issue 10's on the CPU, issue 11's on a GPU. Each: (op, dims,
# direction, measure, statistic over shapes, at least). Measures: a speedup
# ("vs_torch": torch's default kernel, oneDNN or cuDNN; "vs_torch_im2col"),
# or a share of the ceiling in percent ("percent": fresh outputs;
# "percent_out": into a reused out= buffer).
TARGETS = {
    "cpu": [
        ("conv2d", 2, FORWARD, "vs_torch", "median", 1.0),
        ("conv2d", 2, FORWARD, "vs_torch", "min", 0.8),
        ("conv2d", 2, BACKWARD, "vs_torch", "median", 1.0),
        ("conv_transpose2d", 2, FORWARD, "vs_torch", "median", 1.5),
        ("conv_transpose2d", 2, FORWARD, "vs_torch", "min", 1.0),
        ("conv_transpose2d", 2, BACKWARD, "vs_torch", "median", 1.0),
        ("conv2d", 2, FORWARD, "vs_torch_im2col", "median", 2.0),
        ("conv_transpose2d", 2, FORWARD, "vs_torch_im2col", "median", 2.0),
        ("im2col", 2, FORWARD, "vs_torch", "median", 5.0),
        ("col2im", 2, FORWARD, "vs_torch", "median", 5.0),
        ("im2col", 2, FORWARD, "percent_out", "median", 50.0),
    ],
    "cuda": [
        ("conv_transpose2d", 2, FORWARD, "vs_torch", "median", 1.0),
        ("conv2d", 2, FORWARD, "vs_torch", "median", 0.8),
        ("im2col", 2, FORWARD, "percent", "median", 70.0),
        ("col2im", 2, FORWARD, "percent", "median", 70.0),
        ("im2col", 2, FORWARD, "vs_torch", "median", 3.0),
        ("col2im", 2, FORWARD, "vs_torch", "median", 3.0),
    ],
}


def check_targets(summary, device_type):
    """TARGETS[device_type] against the summary: each with its measured value
    (None where the run did not cover it) and whether it passed."""
    checked = []
    for op, dims, direction, measure, stat, least in TARGETS.get(device_type, []):
        entry = next((e for e in summary if e["op"] == op and e["dims"] == dims and e["direction"] == direction), None)
        value = None
        if entry is not None:
            if measure.startswith("vs_"):
                value = entry.get(measure, {}).get(stat)
            else:
                impl = "convt_ext_out" if measure == "percent_out" else "convt_ext"
                value = entry.get("rate", {}).get(impl, {}).get("percent_of_ceiling", {}).get(stat)
        checked.append({"op": op, "dims": dims, "direction": direction, "measure": measure, "statistic": stat,
                        "at_least": least, "measured": value,
                        "status": "not run" if value is None else ("pass" if value >= least else "miss")})
    return checked


def format_targets(checked):
    out = []
    for t in checked:
        what = {"vs_torch": "x torch default", "vs_torch_im2col": "x torch im2col kernel",
                "percent": "% of the ceiling", "percent_out": "% of the ceiling into out="}[t["measure"]]
        measured = "-" if t["measured"] is None else f"{t['measured']:.2f}"
        out.append(f"  {t['status']:7} {op_label(t['op'], t['dims'])} {t['direction']}: {t['statistic']} {measured} "
                   f"(target >= {t['at_least']:g}{what})")
    return "\n".join(out)


def format_summary(summary):
    out = []
    for e in summary:
        parts = []
        for key, what in (("torch", "torch default"), ("torch_im2col", "torch im2col kernel"), ("unfoldNd", "unfoldNd")):
            v = e.get(f"vs_{key}")
            if v:
                parts.append(f"median {v['median']:.2f}x vs {what} (min {v['min']:.2f}x, max {v['max']:.2f}x, "
                             f"faster on {v['wins']}/{v['shapes']})")
        rate = e.get("rate", {})
        if "convt_ext" in rate:
            ours, pct = rate["convt_ext"]["value"], rate["convt_ext"]["percent_of_ceiling"]
            of = "peak" if rate["ceiling"] == "peak_gflops" else "copy bandwidth"
            text = (f"ours {ours['median']:.1f} {rate['unit']} = {pct['median']:.0f}% of {of} "
                    f"({pct['min']:.0f}-{pct['max']:.0f}%)")
            if "torch" in rate:
                text += f", torch {rate['torch']['percent_of_ceiling']['median']:.0f}%"
            if "convt_ext_out" in rate:
                text += f"; into a reused out= buffer {rate['convt_ext_out']['percent_of_ceiling']['median']:.0f}%"
            parts.append(text)
        text = "; ".join(parts) or "nothing timed"
        if e["failures"]:
            text += f"; {e['failures']} FAILED"
        if e["skipped"]:
            text += f"; {e['skipped']} skipped (torch raised)"
        if e["not_built"]:
            text += f"; {e['not_built']} not built"
        out.append(f"{e['label']} {e['direction']}: {text}")
    return "\n".join(out)


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


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
    keys = [(k, what) for k, what in (("torch", "vs torch default"), ("torch_im2col", "vs torch im2col kernel"),
                                      ("unfoldNd", "vs unfoldNd"))
            if any(_speedup(r, k) for r in timed)]
    labels = [f"{op_label(r['op'], r.get('dims', 2))} {'fwd' if r['direction'] == FORWARD else 'fwd+bwd'} {r['shape']}"
              for r in timed]
    fig = Figure(figsize=(9, 1.2 + 0.1 * (len(keys) + 1) * len(timed)))
    ax = fig.add_subplot()
    ys = range(len(timed))
    height = 0.8 / max(len(keys), 1)
    for i, (key, label) in enumerate(keys):
        offset = (i - (len(keys) - 1) / 2) * height
        vals = [_speedup(r, key) or float("nan") for r in timed]
        # bars grow from 1 (parity): right where convt_ext is faster, left where slower
        bars = ax.barh([y + offset for y in ys], [v - 1 for v in vals], left=1, height=height, label=label)
        ax.bar_label(bars, labels=["" if math.isnan(v) else f"{v:.2f}" for v in vals], fontsize=6, padding=2)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_yticks(list(ys), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup of convt_ext (other time / convt_ext time; > 1: convt_ext faster)")
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


def select_cases(ops, shape_filters, quick, backward, dims=DIMS):
    cases = []
    for op in ops:
        for s in SUITE:
            if op not in s.ops or (quick and not s.quick) or s.dims not in dims:
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
    p.add_argument("--dims", default="1,2,3", help="comma list from 1,2,3: the shapes' dimensionality")
    p.add_argument("--shapes", help="comma list of substrings; run the shapes whose name contains one")
    p.add_argument("--quick", action="store_true", help="a few small shapes, 1 round, smaller GEMMs for the peak")
    p.add_argument("--rounds", type=int, help="interleaved rounds per case (default 3, 1 with --quick)")
    p.add_argument("--min-run-time", type=float, help="seconds per blocked_autorange (default 0.3, 0.05 with --quick)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's, all cores)")
    p.add_argument("--no-backward", action="store_true", help="forward only")
    p.add_argument("--channels-last", action="store_true",
                   help="2-d/3-d convolutions on channels_last inputs and weights (both sides)")
    p.add_argument("--tf32", choices=["on", "off"], default="off",
                   help="CUDA float32: TF32 for torch's convolutions and convt_ext's alike (default off)")
    p.add_argument("--gemm-engine", choices=list(convt_ext.GEMM_ENGINES),
                   help="convt_ext's GEMM engine (convt_ext.set_gemm_engine; default: its setting, 'auto')")
    p.add_argument("--out", type=Path, help="JSON path (the PNG goes next to it)")
    p.add_argument("--list", action="store_true", help="print the suite and exit")
    args = p.parse_args(argv)
    args.ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in args.ops if o not in OP_NAMES]
    if unknown or not args.ops:
        p.error(f"--ops: unknown {unknown}; choose from {','.join(OP_NAMES)}")
    try:
        args.dims = tuple(sorted({int(d) for d in args.dims.split(",") if d.strip()}))
    except ValueError:
        args.dims = ()
    if not args.dims or any(d not in DIMS for d in args.dims):
        p.error("--dims: a comma list from 1,2,3")
    args.shapes = [f.strip() for f in args.shapes.split(",") if f.strip()] if args.shapes else []
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.min_run_time = args.min_run_time or (0.05 if args.quick else 0.3)
    if args.rounds < 1 or args.min_run_time <= 0 or (args.threads is not None and args.threads < 1):
        p.error("--rounds, --min-run-time and --threads must be positive")
    return args


def _fmt_reference(ref):
    engines = ", ".join(f"{e} {v:.1f}" for e, v in ref.get("peak_by_engine", {}).items())
    m, k, n = ref["peak_shape"]
    return (f"fp32 peak {ref['peak_gflops']:.1f} GFLOP/s ({ref['peak_engine']}, {m}x{k}x{n} GEMM"
            f"{'; best per engine: ' + engines if engines else ''}), copy {ref['copy_gbps']:.1f} GB/s")


def main(argv=None):
    args = parse_args(argv)
    if args.list:
        for s in SUITE:
            print(f"{s.name:32} {s.dims}-d {','.join(s.ops):34} {'quick ' if s.quick else ''}{s.description}")
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gemm_engine:
        convt_ext.set_gemm_engine(args.gemm_engine)
    dtype = DTYPES[args.dtype]
    cases = select_cases(args.ops, args.shapes, args.quick, not args.no_backward, args.dims)
    if not cases:
        print(f"error: no case matches --ops {','.join(args.ops)} --dims {','.join(map(str, args.dims))} "
              f"--shapes {','.join(args.shapes)}{' --quick' if args.quick else ''} (see --list)", file=sys.stderr)
        return 2

    started = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.set_device(device)
        tf32 = _set_tf32(args.tf32 == "on")
    else:
        tf32 = None
    machine = machine_info(device)
    if device.type == "cuda":
        default = f"cuDNN {machine['cudnn']['version']} (torch's default; TF32 {args.tf32} for both)"
    else:
        default = f"oneDNN {machine['mkldnn']['version']} where torch's dispatch picks it (see torch_backend in the JSON)"
    print(f"convt_ext {convt_ext.__version__} vs torch {torch.__version__} on {device} "
          f"({machine.get('gpu') or machine['cpu']}, {args.dtype}{', channels_last' if args.channels_last else ''}, "
          f"{torch.get_num_threads()} threads); "
          f"torch default = {default}")
    print(f"CPU capability {machine['cpu_capability']} ({_describe_flags(machine['cpu_flags'])}); "
          f"unfoldNd {machine['unfoldNd'] or 'not installed'}")
    engines = convt_ext.engine_info()
    print(f"convt_ext GEMM engine: {engines['setting']} (the rule picks {engines['rule']['float32']} for float32 here; "
          f"available: {', '.join(engines['available'])})")
    ref_start = reference_rates(device, args.quick, args.min_run_time)
    print(f"ceilings: {_fmt_reference(ref_start)}; {len(cases)} cases x {args.rounds} rounds")

    results, probes, last_probe = [], [], time.perf_counter()
    for i, case in enumerate(_progress(cases)):
        if time.perf_counter() - last_probe > PROBE_EVERY_S:  # sample the ceilings again
            probe = reference_rates(device, args.quick, args.min_run_time, probe=True)
            probes.append(dict(probe, before_case=i, elapsed_s=time.perf_counter() - started))
            last_probe = time.perf_counter()
        results.append(run_case(case, device, dtype, args.rounds, args.min_run_time, args.channels_last))

    ref_end = reference_rates(device, args.quick, args.min_run_time)
    reference = combine_references(ref_start, ref_end, probes, machine)
    for r in results:
        add_rates(r, reference)
    table = format_table(results)
    summary = summarize(results)
    failures = sum(r["status"] in FAILED for r in results)
    unbuilt = sorted({op_label(r["op"], r["dims"]) for r in results if r["status"] == NOT_BUILT})
    print()
    print(table)
    print()
    during = f", best of {len(probes)} samples during the run {max(p['peak_gflops'] for p in probes):.1f}" if probes else ""
    print(f"ceilings (best of all measurements): {_fmt_reference(reference)} "
          f"(peak at start {ref_start['peak_gflops']:.1f}, at end {ref_end['peak_gflops']:.1f}{during})")
    print("%peak = ours GFLOP/s over that fp32 peak (convolutions) or GB/s over the copy bandwidth (im2col/col2im)")
    print("speedup = other time / convt_ext time (> 1: convt_ext faster); median over shapes of the per-round medians:")
    print(format_summary(summary))
    targets = check_targets(summary, device.type)
    if targets:
        print(f"targets ({'issue 11, GPU' if device.type == 'cuda' else 'issue 10, CPU'}; "
              f"{sum(t['status'] == 'pass' for t in targets)} of {len(targets)} met):")
        print(format_targets(targets))
    if unbuilt:
        print(f"not built: this convt_ext lacks {', '.join(unbuilt)}; those cases were skipped "
              f"(rebuild: pip install --no-build-isolation .)")

    out = args.out or default_out(device.type)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "schema": 2,
        "command": ["python", "-m", "convt_ext.bench", *(sys.argv[1:] if argv is None else argv)],
        "settings": {
            "device": str(device), "dtype": args.dtype, "ops": args.ops, "dims": list(args.dims), "shapes": args.shapes,
            "quick": args.quick, "rounds": args.rounds, "min_run_time_s": args.min_run_time,
            "backward": not args.no_backward, "cuda_scale": CUDA_SCALE, "channels_last": args.channels_last,
            "tolerances": {"rtol": TOLERANCES[dtype][0], "atol_x_max_abs": TOLERANCES[dtype][1]},
            "tf32": tf32,
        },
        "machine": machine,
        # The GEMM engine setting, and per engine how many GEMMs it ran.
        "gemm": convt_ext.engine_info(),
        "reference": reference,
        "suite": [asdict(s) for s in SUITE],
        "results": results,
        "summary": summary,
        "targets": targets,
        "failures": failures,
        "not_built": unbuilt,
        "elapsed_s": time.perf_counter() - started,
    }
    out.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {out}")
    title = (f"convt_ext vs torch {torch.__version__}, {machine.get('gpu') or machine['cpu']}, "
             f"{torch.get_num_threads()} threads, {args.dtype}{', channels_last' if args.channels_last else ''}, "
             f"GEMM {engines['setting']}, {machine['date'][:10]}\n"
             f"fp32 peak {reference['peak_gflops']:.0f} GFLOP/s ({reference['peak_engine']}), "
             f"copy {reference['copy_gbps']:.0f} GB/s, CPU capability {machine['cpu_capability']}")
    chart = plot(results, out.with_suffix(".png"), title)
    if chart:
        print(f"chart: {chart}")
    else:
        print(f"chart: none ({'nothing was timed' if _has_matplotlib() else 'matplotlib is not installed'})")
    if failures:
        print(f"{failures} case(s) FAILED the check against torch", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
