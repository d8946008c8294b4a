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
model (layers.py)."""
from __future__ import annotations

import statistics
import sys
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

import convt_ext
import convt_ext.nn

from . import layers, machine, report
from .measure import FAILED, check
from .model import close, interleaved, speedup, where

BATCH, QUICK_BATCH, SIZE = 8, 2, 160  # inputs BATCH x 3 x SIZE x SIZE (--quick: QUICK_BATCH)
STEM, LAST, CLASSES = 32, 1280, 1000
# (t, c, n, s): n blocks of c output channels, expanding t times, the first of stride s.
BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
MODES = ("inference", "training")
TARGET = 1.0  # ours at least as fast as torch's, each mode in each format, float32


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


class Side:
    """One side's model in one memory format, its fixed batch and labels, and its optimizer."""

    def __init__(self, conv, state, device, batch, memory_format):
        self.model = mobilenetv2(conv).to(device)
        if state is not None:
            self.model.load_state_dict(state)
        self.model.to(memory_format=memory_format)
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch, 3, SIZE, SIZE, generator=gen).to(device).contiguous(memory_format=memory_format)
        self.labels = torch.randint(CLASSES, (batch,), generator=gen).to(device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.device = device

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def inference(self):
        self.model.eval()
        with torch.no_grad():
            y = self.model(self.x)
        self._sync()
        return y

    def training(self):
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(self.x), self.labels)
        loss.backward()
        self.opt.step()
        self._sync()
        return loss.item()


def _first_calls(theirs, ours):
    """Both sides' first inference and training step from the same weights and batch.
    Judged: the logits (measure.check's float32 tolerance) and the loss. The gradients
    are only recorded, as |ours - torch's| / |torch's| over all parameters: through 52
    layers of train-mode batch norm at a small batch, float32 rounding moves torch's
    own gradients ~0.5% from float64's, and a batch-norm output within rounding of 0
    flips ReLU6's mask, so no elementwise tolerance separates rounding from error
    there. Each layer's gradients are checked elementwise in the layer table.
    Returns (agree, what differs or None, the losses, that gradient difference)."""
    problem = check([ours.inference()], [theirs.inference()], torch.float32, ["logits"])
    losses = [theirs.training(), ours.training()]
    if problem is None and not close(losses[:1], losses[1:], rtol=1e-4):
        problem = f"loss: torch {losses[0]}, convt_ext {losses[1]}"
    grads = [torch.cat([p.grad.flatten() for p in side.model.parameters()]) for side in (theirs, ours)]
    grad_diff = ((grads[1] - grads[0]).norm() / grads[0].norm()).item()
    return problem is None, problem, {"torch": losses[0], "convt_ext": losses[1]}, grad_diff


def _time(fmt, args, device, batch, calls):
    """One format: both sides built, checked on their first calls, then timed in interleaved rounds."""
    torch.manual_seed(0)
    theirs = Side(nn.Conv2d, None, device, batch, FORMATS[fmt])
    ours = Side(convt_ext.nn.Conv2d, theirs.model.state_dict(), device, batch, FORMATS[fmt])
    agree, problem, losses, grad_diff = _first_calls(theirs, ours)
    result = {"agree": agree, "problem": problem, "first_losses": losses, "grad_rel_diff": grad_diff}
    for mode in MODES:
        rounds = interleaved({"torch": getattr(theirs, mode), "convt_ext": getattr(ours, mode)}, args.rounds, calls)
        ratio = speedup(rounds)
        result[mode] = {"round_s": rounds, "speedup": ratio, "target": TARGET,
                        "status": "pass" if ratio >= TARGET else "miss"}
    return result


def _format(results):
    rows = [(fmt, mode, f"{statistics.median(r[mode]['round_s']['torch']) * 1e3:.1f}",
             f"{statistics.median(r[mode]['round_s']['convt_ext']) * 1e3:.1f}", report._fmt_x(r[mode]["speedup"]),
             f">= {TARGET:.2f}x", r[mode]["status"]) for fmt, r in results.items() for mode in MODES]
    return report._align(("format", "mode", "torch ms", "ours ms", "speedup", "goal", "result"), rows, left=2,
                         indent="  ")


def main(args, device):
    batch, calls = (QUICK_BATCH, 1) if args.quick else (BATCH, 3)
    formats = ["channels_last"] if args.channels_last else list(FORMATS)
    info = machine.machine_info(device)
    print(f"MobileNetV2 at {SIZE}x{SIZE}, batch {batch}, float32, {where(device, info)}; "
          f"convt_ext path {convt_ext.conv_path()}, GEMM engine {convt_ext.gemm_engine()}")
    results = {fmt: _time(fmt, args, device, batch, calls) for fmt in formats}
    print("\n".join(_format(results)))
    print(f"  (median of {args.rounds} rounds of {calls} calls; speedup = torch's time / ours, > 1: convt_ext faster)")
    for fmt, r in results.items():
        print(f"  {fmt}: first call's logits and loss {'agree' if r['agree'] else 'DIFFER: ' + r['problem']} "
              f"(loss: torch {r['first_losses']['torch']:.6f}, convt_ext {r['first_losses']['convt_ext']:.6f}; "
              f"gradients {100 * r['grad_rel_diff']:.2g}% apart, norm-wise, not judged)")

    found = layers.conv_layers(mobilenetv2(nn.Conv2d).to(device).eval(), torch.zeros(batch, 3, SIZE, SIZE,
                                                                                       device=device))
    print(f"\nevery conv layer alone, F.conv2d against convt_ext.conv2d on its input in the model "
          f"({args.rounds} rounds of {args.min_run_time:g} s):")
    rows = layers.time_layers(found, device, args.rounds, args.min_run_time, formats, not args.no_backward)
    print(layers.format_table(rows))
    failed = sum(rec["status"] in FAILED for r in rows for d in r["cases"].values() for rec in d.values())

    targets = [{"format": fmt, "mode": mode, "at_least": TARGET, "measured": r[mode]["speedup"],
                "status": r[mode]["status"]} for fmt, r in results.items() for mode in MODES]
    out = args.out or report.default_out(f"{device.type}-mobilenetv2")
    report.write_json(out, command=["python", "-m", "convt_ext.bench", *sys.argv[1:]], machine=info,
                      model="mobilenetv2", batch=batch, size=SIZE, blocks=BLOCKS, calls_per_round=calls,
                      rounds=args.rounds, min_run_time_s=args.min_run_time, formats=results, targets=targets,
                      agree=all(r["agree"] for r in results.values()),
                      layers={"rows": rows, "totals": layers.totals(rows),
                              "grouped_totals": layers.totals(rows, layers.grouped)},
                      gemm=convt_ext.engine_info(), conv_path=convt_ext.engine_info()["path"])
    print(f"wrote {out}")
    if failed:
        print(f"{failed} layer case(s) FAILED the check against torch", file=sys.stderr)
    return 0 if all(r["agree"] for r in results.values()) and not failed else 1
