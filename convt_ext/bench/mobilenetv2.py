"""MobileNetV2, ours against torch's (python -m convt_ext.bench --model mobilenetv2).

DCGAN's step is dense convolutions; MobileNetV2 (Sandler et al.) is mostly
depthwise 3x3 convolutions (groups = channels) between 1x1 ones, the layers
an im2col + GEMM library finds hardest: one tiny GEMM per channel. Written
out here (no torchvision): a 3x3 stride-2 stem to 32 channels, the paper's 17
inverted residual blocks (BLOCKS: expand 1x1 to t times the channels,
depthwise 3x3, project 1x1, a residual where stride 1 keeps the channels), a
1x1 to 1280 channels, and a linear classifier. Both sides build it from the
same weights, torch's with torch.nn.Conv2d and ours with convt_ext.nn.Conv2d,
in NCHW and in channels_last, and each is timed (a) at inference, eval mode
under torch.no_grad(), and (b) for a training step: cross entropy, backward,
SGD with momentum. Then every conv layer alone on its input shape in the
model (layers.py). All but the model itself is the classifiers' harness
(model.run_classifier), shared with resnet18.py."""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

from . import model
from .model import FORMATS, MODES, TARGET  # noqa: F401  (the harness's, named here as before)

BATCH, QUICK_BATCH, SIZE = 8, 2, 160  # inputs BATCH x 3 x SIZE x SIZE (--quick: QUICK_BATCH)
STEM, LAST, CLASSES = 32, 1280, 1000
# (t, c, n, s): n blocks of c output channels, expanding t times, the first of stride s.
BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def conv_bn(conv, c_in, c_out, kernel, stride=1, groups=1, act=True):
    parts = [("conv", conv(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False)),
             ("bn", nn.BatchNorm2d(c_out))]
    return nn.Sequential(OrderedDict(parts + ([("act", nn.ReLU6(inplace=True))] if act else [])))


class InvertedResidual(nn.Module):
    def __init__(self, conv, c_in, c_out, stride, t):
        super().__init__()
        hidden = c_in * t
        self.expand = conv_bn(conv, c_in, hidden, 1) if t != 1 else nn.Identity()
        self.depthwise = conv_bn(conv, hidden, hidden, 3, stride, groups=hidden)
        self.project = conv_bn(conv, hidden, c_out, 1, act=False)  # linear: no ReLU6 on the bottleneck
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.residual else y


def mobilenetv2(conv):
    """The model with `conv` (torch.nn.Conv2d or convt_ext.nn.Conv2d) for every convolution."""
    parts, c = [("stem", conv_bn(conv, 3, STEM, 3, 2))], STEM
    for t, c_out, n, s in BLOCKS:
        for i in range(n):
            parts.append((f"block{len(parts)}", InvertedResidual(conv, c, c_out, s if i == 0 else 1, t)))
            c = c_out
    parts += [("last", conv_bn(conv, c, LAST, 1)), ("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()),
              ("classifier", nn.Linear(LAST, CLASSES))]
    return nn.Sequential(OrderedDict(parts))


def main(args, device):
    return model.run_classifier(args, device, model.Classifier(
        "mobilenetv2", "MobileNetV2", mobilenetv2, SIZE, CLASSES, BATCH, QUICK_BATCH, {"blocks": BLOCKS}))
