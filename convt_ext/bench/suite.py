"""The benchmark's suite: the layers it times (SUITE), what a case is (an op
on a shape in one direction), and which cases a command line selects.

Shapes are data. Their sizes come from the package's one set of shape
formulas (convt_ext/_geometry.py), the same the fake kernels use."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from .._geometry import prod, transposed_size, window_count

UNFOLD_OPS = ("im2col", "col2im")
CONV_OPS = ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
OP_NAMES = UNFOLD_OPS + CONV_OPS
DIMS = (1, 2, 3)
FORWARD, BACKWARD = "forward", "forward+backward"
CUDA_SCALE = 8  # CUDA batch = CPU batch x CUDA_SCALE unless a shape says otherwise


def has_backward(op):
    """Convolutions are timed forward and forward+backward; im2col/col2im forward only."""
    return op in CONV_OPS


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
            return self.c_out, tuple(map(transposed_size, self.sizes, self.kernels, self.strides, self.paddings,
                                         self.output_paddings, self.dilations))
        return self.c_in, self.sizes

    @property
    def windows(self):
        """Window positions per dimension on the large side (the small side's sizes)."""
        return tuple(map(window_count, self.big[1], self.kernels, self.strides, self.paddings, self.dilations))

    def flops(self, batch):
        """Forward FLOPs: 2 N C_small (C_big / G) prod(kernel) prod(small side);
        for a direct conv that is 2 N C_out (C_in/G) kh kw OH OW in 2-d."""
        c_small, c_big = (self.c_in, self.c_out) if self.transposed else (self.c_out, self.c_in)
        return 2 * batch * c_small * (c_big // self.groups) * prod(self.kernels) * prod(self.windows)

    def unfold_bytes(self, batch, itemsize):
        """Bytes of the column matrix plus the image, for im2col/col2im."""
        c, sizes = self.big
        return batch * c * (prod(self.kernels) * prod(self.windows) + prod(sizes)) * itemsize


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
    # depthwise (groups = channels) and grouped layers, 1-d to 3-d, direct and transposed: MobileNet,
    # EfficientNet and ConvNeXt blocks and their kin, where each group is a GEMM of a few rows
    Shape("mbv2-dw-3x3-144-28", "MobileNetV2 depthwise 3x3, 144 channels at 28x28", ("conv2d",), 8, 144, 144, 28, 3, padding=1, groups=144, quick=True),
    Shape("mbv2-dw-3x3-s2-96-56", "MobileNetV2 depthwise 3x3 stride 2, 96 channels, 56->28", ("conv2d",), 8, 96, 96, 56, 3, 2, 1, groups=96),
    Shape("convnext-dw-7x7-96-56", "ConvNeXt depthwise 7x7 padding 3, 96 channels at 56x56", ("conv2d",), 8, 96, 96, 56, 7, padding=3, groups=96),
    Shape("dw-3x3-384-14", "late-stage depthwise 3x3, 384 channels at 14x14", ("conv2d",), 8, 384, 384, 14, 3, padding=1, groups=384),
    Shape("dw-cm2-3x3-64to128-28", "depthwise 3x3 with channel multiplier 2, 64->128, 64 groups, at 28x28", ("conv2d",), 8, 64, 128, 28, 3, padding=1, groups=64),
    Shape("resnext-3x3-g32-128-56", "ResNeXt 32x4d grouped 3x3, 128->128, 32 groups of 4 channels, at 56x56", ("conv2d",), 8, 128, 128, 56, 3, padding=1, groups=32),
    Shape("dw-up-4x4-s2-96-28", "depthwise 4x4 s2 p1 transposed, 96 channels, 28->56", ("conv_transpose2d",), 8, 96, 96, 28, 4, 2, 1, groups=96, transposed=True),
    Shape("dw-1d-k5-256-1024", "1-d depthwise 5-tap padding 2, 256 channels over 1024 frames", ("conv1d",), 8, 256, 256, 1024, 5, padding=2, groups=256, dims=1, quick=True),
    Shape("dw-up-1d-k4-s2-128-2000", "1-d depthwise 4-tap s2 p1 transposed, 128 channels, 2000->4000", ("conv_transpose1d",), 4, 128, 128, 2000, 4, 2, 1, groups=128, transposed=True, dims=1),
    Shape("dw-3x3x3-64-16", "3-d depthwise 3x3x3, 64 channels on 16^3", ("conv3d",), 2, 64, 64, 16, 3, padding=1, groups=64, dims=3),
    Shape("dw-up-2x2x2-s2-32-8x16x16", "3-d depthwise 2x2x2 s2 transposed, 32 channels, 8x16x16->16x32x32", ("conv_transpose3d",), 4, 32, 32, (8, 16, 16), 2, 2, groups=32, transposed=True, dims=3),
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

# Layers the view path's blocking and rule were never tuned on, committed
# before the tuning (python -m convt_ext.bench --held-out): a check that what
# the suite shows is not fitted to it.
HELD_OUT = [
    Shape("vgg-3x3-128-56", "VGG 3x3, 128->128 at 56x56", ("conv2d",), 4, 128, 128, 56, 3, padding=1),
    Shape("unet-3x3-64-96", "U-Net 3x3, 64->64 at 96x96, bias", ("conv2d",), 2, 64, 64, 96, 3, padding=1, bias=True),
    Shape("5x5-48to64-32", "5x5 p2, 48->64 at 32x32", ("conv2d",), 8, 48, 64, 32, 5, padding=2),
    Shape("disc-4x4-s2-128to256-16", "GAN discriminator 4x4 s2 p1, 128->256, 16->8", ("conv2d",), 32, 128, 256, 16, 4, 2, 1),
    Shape("atrous-3x3-d4-128-32", "atrous 3x3 dilation 4, 128->128 at 32x32", ("conv2d",), 4, 128, 128, 32, 3, padding=4, dilation=4),
    Shape("grouped-3x3-g4-128-28", "grouped 3x3, 4 groups, 128->128 at 28x28", ("conv2d",), 8, 128, 128, 28, 3, padding=1, groups=4),
    Shape("rect-1x7-96to128-17", "Inception 1x7, 96->128 at 17x17", ("conv2d",), 8, 96, 128, 17, (1, 7), padding=(0, 3)),
    Shape("decoder-3x3-s2-op1-256to128-14", "decoder 3x3 s2 p1 output_padding 1 transposed, 256->128, 14->28", ("conv_transpose2d",), 8, 256, 128, 14, 3, 2, 1, 1, transposed=True),
    Shape("up-4x4-s2-128to128-24", "4x4 s2 p1 transposed, 128->128, 24->48", ("conv_transpose2d",), 4, 128, 128, 24, 4, 2, 1, transposed=True),
    Shape("transposed-3x3-s1-64-40", "3x3 s1 p1 transposed, 64->64 at 40x40", ("conv_transpose2d",), 4, 64, 64, 40, 3, 1, 1, transposed=True),
    Shape("wavenet-1d-k2-d4-128-8000", "1-d 2-tap dilation 4, 128->128 over 8000 samples", ("conv1d",), 4, 128, 128, 8000, 2, dilation=4, dims=1),
    Shape("tts-1d-k5-256-1000", "1-d 5-tap p2, 256->256 over 1000 frames, bias", ("conv1d",), 8, 256, 256, 1000, 5, padding=2, bias=True, dims=1),
    Shape("upsample-1d-k8-s4-256to128-250", "1-d 8-tap s4 p2 transposed, 256->128, 250->1000", ("conv_transpose1d",), 8, 256, 128, 250, 8, 4, 2, transposed=True, dims=1),
    Shape("video-3x3x3-64-8x28x28", "3-d 3x3x3, 64->64 on 8x28x28", ("conv3d",), 2, 64, 64, (8, 28, 28), 3, padding=1, dims=3),
    Shape("volume-up-3x3x3-s2-64to32-12", "3-d 3x3x3 s2 p1 output_padding 1 transposed, 64->32, 12^3->24^3", ("conv_transpose3d",), 2, 64, 32, 12, 3, 2, 1, 1, transposed=True, dims=3),
]


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


def select_cases(ops, shape_filters, quick, backward, dims=DIMS, shapes=None):
    cases = []
    for op in ops:
        for s in SUITE if shapes is None else shapes:
            if op not in s.ops or (quick and not s.quick) or s.dims not in dims:
                continue
            if shape_filters and not any(f in s.name for f in shape_filters):
                continue
            cases.append(Case(op, s, FORWARD))
            if backward and has_backward(op):
                cases.append(Case(op, s, BACKWARD))
    return cases
