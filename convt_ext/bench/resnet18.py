"""ResNet-18, ours against torch's (python -m convt_ext.bench --model resnet18).

MobileNetV2 is mostly depthwise layers, where a GEMM finds little to do;
ResNet-18 (He et al.) is the other end: dense 3x3 convolutions of 64 to 512
channels, the layers the GEMM paths are built for, so the whole model shows
whether they hold up next to batch norm, ReLU, the residual adds and a
training step's backward in autograd's order. Written out here (no
torchvision): a 7x7 stride-2 stem to 64 channels with batch norm, ReLU and a
3x3 stride-2 max pool, four stages of two basic blocks (STAGES: two 3x3
convolutions and a residual; the first block of stages 2-4 halves the map
with stride 2 and brings the residual along by a 1x1 stride-2 convolution
with batch norm), an average pool and a linear classifier. Both sides build
it from the same weights, torch's with torch.nn.Conv2d and ours with
convt_ext.nn.Conv2d, in NCHW and in channels_last, and each is timed (a) at
inference, eval mode under torch.no_grad(), and (b) for a training step:
cross entropy, backward, SGD with momentum. Then every conv layer alone on
its input shape in the model (layers.py), each forward held to at least the
lower of torch's rate and LAYER_FMA_PERCENT of the FMA peak. All but the model
itself is the classifiers' harness (model.run_classifier), shared with
mobilenetv2.py."""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

from . import model

BATCH, QUICK_BATCH, SIZE = 8, 2, 160  # inputs BATCH x 3 x SIZE x SIZE (--quick: QUICK_BATCH)
STEM, CLASSES = 64, 1000
# (c, s): a stage of two basic blocks of c output channels, the first of stride s.
STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))
LAYER_TARGET, LAYER_FMA_PERCENT = 1.0, 88.0  # each conv forward: at least min(1.0x torch, 88% of the FMA peak)


def conv_bn(conv, c_in, c_out, kernel, stride=1):
    return nn.Sequential(OrderedDict([("conv", conv(c_in, c_out, kernel, stride, kernel // 2, bias=False)),
                                      ("bn", nn.BatchNorm2d(c_out))]))


class BasicBlock(nn.Module):
    def __init__(self, conv, c_in, c_out, stride):
        super().__init__()
        self.conv1 = conv_bn(conv, c_in, c_out, 3, stride)
        self.conv2 = conv_bn(conv, c_out, c_out, 3)
        # The residual at the block's output shape: a 1x1 strided projection where that changes.
        self.downsample = conv_bn(conv, c_in, c_out, 1, stride) if stride != 1 or c_in != c_out else nn.Identity()

    def forward(self, x):
        y = self.conv2(nn.functional.relu(self.conv1(x), inplace=True))
        return nn.functional.relu(y + self.downsample(x), inplace=True)


def resnet18(conv):
    """The model with `conv` (torch.nn.Conv2d or convt_ext.nn.Conv2d) for every convolution."""
    parts, c = [("stem", conv_bn(conv, 3, STEM, 7, 2)), ("relu", nn.ReLU(inplace=True)),
                ("maxpool", nn.MaxPool2d(3, 2, 1))], STEM
    for i, (c_out, s) in enumerate(STAGES, 1):
        parts.append((f"layer{i}", nn.Sequential(BasicBlock(conv, c, c_out, s), BasicBlock(conv, c_out, c_out, 1))))
        c = c_out
    parts += [("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()), ("fc", nn.Linear(c, CLASSES))]
    return nn.Sequential(OrderedDict(parts))


def main(args, device):
    return model.run_classifier(args, device, model.Classifier(
        "resnet18", "ResNet-18", resnet18, SIZE, CLASSES, BATCH, QUICK_BATCH, {"stages": STAGES},
        layer_goal=(LAYER_TARGET, LAYER_FMA_PERCENT)))
