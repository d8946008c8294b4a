"""A model's training step, ours against torch's (python -m convt_ext.bench --model dcgan).

The layers' speed is one thing; a training step also runs batch norm,
activations, the loss and the optimizer, and the convolutions' backward in
the order autograd asks for them. DCGAN (Radford et al.) at 64x64, batch 64:
a generator of four 4x4 stride-2 transposed convolutions after a 4x4
projection of the noise, and a discriminator of five 4x4 convolutions. Both
sides build the same model from the same initial weights, torch's with
torch.nn.Conv2d/ConvTranspose2d and ours with convt_ext.nn's; a step is the
usual two updates, the discriminator's on a real and a fake batch, then the
generator's.

The timing loop (interleaved), the speedup and the loss check are the model
modes' own. So is the classifiers' harness (run_classifier), which
mobilenetv2.py and resnet18.py share: each hands over only how to build its
model; the two sides, the formats and modes, the check of the first calls,
the timing, the layer table, the goals and the JSON are the same for both."""
from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import convt_ext
import convt_ext.nn

from . import layers, machine, report
from .measure import FAILED, check

NZ, NGF, NDF, BATCH = 100, 64, 64, 64
TARGET = 1.0  # ours at least as fast as torch's: the DCGAN step, each classifier mode in each format, float32


def generator(conv_t):
    def up(c_in, c_out, stride=2, padding=1):
        return [conv_t(c_in, c_out, 4, stride, padding, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True)]
    return nn.Sequential(
        *up(NZ, NGF * 8, 1, 0), *up(NGF * 8, NGF * 4), *up(NGF * 4, NGF * 2), *up(NGF * 2, NGF),
        conv_t(NGF, 3, 4, 2, 1, bias=False), nn.Tanh())


def discriminator(conv):
    def down(c_in, c_out, norm=True):
        return [conv(c_in, c_out, 4, 2, 1, bias=False), *([nn.BatchNorm2d(c_out)] if norm else []),
                nn.LeakyReLU(0.2, inplace=True)]
    return nn.Sequential(
        *down(3, NDF, norm=False), *down(NDF, NDF * 2), *down(NDF * 2, NDF * 4), *down(NDF * 4, NDF * 8),
        conv(NDF * 8, 1, 4, 1, 0, bias=False), nn.Flatten())


class Step:
    """One side's models, optimizers and fixed batches; step() runs a training step."""

    def __init__(self, conv, conv_t, state, device):
        self.g, self.d = generator(conv_t).to(device), discriminator(conv).to(device)
        if state is not None:
            self.g.load_state_dict(state[0])
            self.d.load_state_dict(state[1])
        self.opt_g = torch.optim.Adam(self.g.parameters(), 2e-4, betas=(0.5, 0.999))
        self.opt_d = torch.optim.Adam(self.d.parameters(), 2e-4, betas=(0.5, 0.999))
        gen = torch.Generator().manual_seed(0)
        self.z = torch.randn(BATCH, NZ, 1, 1, generator=gen).to(device)
        self.real = torch.randn(BATCH, 3, 64, 64, generator=gen).to(device)
        self.ones = torch.ones(BATCH, 1, device=device)
        self.zeros = torch.zeros(BATCH, 1, device=device)
        self.device = device

    def step(self):
        loss = nn.functional.binary_cross_entropy_with_logits
        self.opt_d.zero_grad(set_to_none=True)
        fake = self.g(self.z)
        d_loss = loss(self.d(self.real), self.ones) + loss(self.d(fake.detach()), self.zeros)
        d_loss.backward()
        self.opt_d.step()
        self.opt_g.zero_grad(set_to_none=True)
        g_loss = loss(self.d(fake), self.ones)
        g_loss.backward()
        self.opt_g.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return d_loss.item(), g_loss.item()


def interleaved(sides, rounds, calls):
    """{key: [per round, the median seconds of `calls` calls of sides[key]()]}. The sides
    take turns, in the order given in even rounds and reversed in odd ones, so that
    neither always runs on the caches and clocks the other left behind."""
    round_s = {key: [] for key in sides}
    for r in range(rounds):
        for key, fn in list(sides.items())[:: 1 if r % 2 == 0 else -1]:
            times = []
            for _ in range(calls):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            round_s[key].append(statistics.median(times))
    return round_s


def speedup(round_s):
    """torch's time over ours: the median over rounds of the per-round ratios (> 1: ours faster)."""
    return statistics.median(a / b for a, b in zip(round_s["torch"], round_s["convt_ext"]))


def close(expected, got, rtol=1e-3):
    """Whether two lists of losses agree to float32 rounding over a model's many layers."""
    return all(abs(a - b) <= rtol * max(1.0, abs(a)) for a, b in zip(expected, got))


def where(device, info):
    """The machine in a few words, for a model's first line."""
    return (f"on {device} ({info.get('gpu') or info['cpu']}, CPU capability {info['cpu_capability']}, "
            f"{torch.get_num_threads()} threads)")


def main(args, device):
    torch.manual_seed(0)
    theirs = Step(nn.Conv2d, nn.ConvTranspose2d, None, device)
    state = (theirs.g.state_dict(), theirs.d.state_dict())
    ours = Step(convt_ext.nn.Conv2d, convt_ext.nn.ConvTranspose2d, state, device)
    # The first step from the same weights and batches: the same losses, to float32 rounding.
    expected, got = theirs.step(), ours.step()
    agree = close(expected, got)
    steps = 1 if args.quick else 3
    rounds = interleaved({"torch": theirs.step, "convt_ext": ours.step}, args.rounds, steps)
    ratio = speedup(rounds)
    info = machine.machine_info(device)
    print(f"DCGAN 64x64 training step, batch {BATCH}, float32, {where(device, info)}")
    print(f"  torch     {statistics.median(rounds['torch']) * 1e3:8.1f} ms a step")
    print(f"  convt_ext {statistics.median(rounds['convt_ext']) * 1e3:8.1f} ms a step "
          f"(path {convt_ext.conv_path()}, GEMM engine {convt_ext.gemm_engine()})")
    print(f"  speedup {ratio:.2f}x (median of {args.rounds} rounds of {steps} steps; "
          f"goal: at least {TARGET:.1f}x): {'pass' if ratio >= TARGET else 'miss'}")
    print(f"  first step's losses: torch {expected}, convt_ext {got}: {'agree' if agree else 'DIFFER'}")
    out = args.out or report.default_out(f"{device.type}-dcgan")
    report.write_json(out, command=["python", "-m", "convt_ext.bench", *sys.argv[1:]], machine=info,
                      model="dcgan", batch=BATCH, steps_per_round=steps, round_s=rounds, speedup=ratio,
                      target=TARGET, first_losses={"torch": expected, "convt_ext": got}, agree=agree,
                      conv_path=convt_ext.engine_info()["path"])
    print(f"wrote {out}")
    return 0 if agree else 1


# The classifiers (--model mobilenetv2, resnet18): both sides in each format, each mode.
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
MODES = ("inference", "training")


@dataclasses.dataclass
class Classifier:
    """What a classifier mode hands the harness: its name (the JSON's, the file's), its
    title, build(conv) -> the model with `conv` (torch.nn.Conv2d or convt_ext.nn.Conv2d)
    for every convolution, its inputs (batch x 3 x size x size), its classes, the JSON's
    own fields (`extra`), and optionally a goal for each conv layer forward: at least
    layer_goal[0] times torch's speed or layer_goal[1] percent of the FMA peak, whichever
    rate is lower (layers.goals)."""
    name: str
    title: str
    build: Callable
    size: int
    classes: int
    batch: int
    quick_batch: int
    extra: dict = dataclasses.field(default_factory=dict)
    layer_goal: tuple | None = None


class Side:
    """One side's model in one memory format, its fixed batch and labels, and its optimizer."""

    def __init__(self, spec, conv, state, device, batch, memory_format):
        self.model = spec.build(conv).to(device)
        if state is not None:
            self.model.load_state_dict(state)
        self.model.to(memory_format=memory_format)
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch, 3, spec.size, spec.size, generator=gen).to(device).contiguous(
            memory_format=memory_format)
        self.labels = torch.randint(spec.classes, (batch,), generator=gen).to(device)
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
    are only recorded, as |ours - torch's| / |torch's| over all parameters: through
    tens of layers of train-mode batch norm at a small batch, float32 rounding moves
    torch's own gradients ~0.5% from float64's, and a batch-norm output within rounding
    of 0 flips a ReLU's mask, so no elementwise tolerance separates rounding from error
    there. Each layer's gradients are checked elementwise in the layer table.
    Returns (agree, what differs or None, the losses, that gradient difference)."""
    problem = check([ours.inference()], [theirs.inference()], torch.float32, ["logits"])
    losses = [theirs.training(), ours.training()]
    if problem is None and not close(losses[:1], losses[1:], rtol=1e-4):
        problem = f"loss: torch {losses[0]}, convt_ext {losses[1]}"
    grads = [torch.cat([p.grad.flatten() for p in side.model.parameters()]) for side in (theirs, ours)]
    grad_diff = ((grads[1] - grads[0]).norm() / grads[0].norm()).item()
    return problem is None, problem, {"torch": losses[0], "convt_ext": losses[1]}, grad_diff


def _time_format(spec, fmt, args, device, batch, calls):
    """One format: both sides built, checked on their first calls, then timed in interleaved rounds."""
    torch.manual_seed(0)
    theirs = Side(spec, nn.Conv2d, None, device, batch, FORMATS[fmt])
    ours = Side(spec, convt_ext.nn.Conv2d, theirs.model.state_dict(), device, batch, FORMATS[fmt])
    agree, problem, losses, grad_diff = _first_calls(theirs, ours)
    result = {"agree": agree, "problem": problem, "first_losses": losses, "grad_rel_diff": grad_diff}
    for mode in MODES:
        rounds = interleaved({"torch": getattr(theirs, mode), "convt_ext": getattr(ours, mode)}, args.rounds, calls)
        ratio = speedup(rounds)
        result[mode] = {"round_s": rounds, "speedup": ratio, "target": TARGET,
                        "status": "pass" if ratio >= TARGET else "miss"}
    return result


def _format_modes(results):
    rows = [(fmt, mode, f"{statistics.median(r[mode]['round_s']['torch']) * 1e3:.1f}",
             f"{statistics.median(r[mode]['round_s']['convt_ext']) * 1e3:.1f}", report._fmt_x(r[mode]["speedup"]),
             f">= {TARGET:.2f}x", r[mode]["status"]) for fmt, r in results.items() for mode in MODES]
    return report._align(("format", "mode", "torch ms", "ours ms", "speedup", "goal", "result"), rows, left=2,
                         indent="  ")


def run_classifier(args, device, spec):
    """A classifier mode from start to end: the whole model in each format and mode
    against the goal of at least torch's speed, then every conv layer alone (and its
    goal, where spec.layer_goal sets one), the JSON. Returns the exit status."""
    batch, calls = (spec.quick_batch, 1) if args.quick else (spec.batch, 3)
    formats = ["channels_last"] if args.channels_last else list(FORMATS)
    info = machine.machine_info(device)
    print(f"{spec.title} at {spec.size}x{spec.size}, batch {batch}, float32, {where(device, info)}; "
          f"convt_ext path {convt_ext.conv_path()}, GEMM engine {convt_ext.gemm_engine()}")
    results = {fmt: _time_format(spec, fmt, args, device, batch, calls) for fmt in formats}
    print("\n".join(_format_modes(results)))
    print(f"  (median of {args.rounds} rounds of {calls} calls; speedup = torch's time / ours, > 1: convt_ext faster)")
    for fmt, r in results.items():
        print(f"  {fmt}: first call's logits and loss {'agree' if r['agree'] else 'DIFFER: ' + r['problem']} "
              f"(loss: torch {r['first_losses']['torch']:.6f}, convt_ext {r['first_losses']['convt_ext']:.6f}; "
              f"gradients {100 * r['grad_rel_diff']:.2g}% apart, norm-wise, not judged)")

    # The ceiling a layer's rate is held to besides torch's (CPU only: {} elsewhere), the
    # better of a sample before the layers and one after, as the suite takes its ceilings.
    fma_seconds = 0.3 if args.quick else 1.0
    fma = machine.fma_peak(device, fma_seconds) if spec.layer_goal else {}
    found = layers.conv_layers(spec.build(nn.Conv2d).to(device).eval(),
                               torch.zeros(batch, 3, spec.size, spec.size, device=device))
    print(f"\nevery conv layer alone, F.conv2d against convt_ext.conv2d on its input in the model "
          f"({args.rounds} rounds of {args.min_run_time:g} s):")
    rows = layers.time_layers(found, device, args.rounds, args.min_run_time, formats, not args.no_backward)
    print(layers.format_table(rows))
    failed = sum(rec["status"] in FAILED for r in rows for d in r["cases"].values() for rec in d.values())

    targets = [{"format": fmt, "mode": mode, "at_least": TARGET, "measured": r[mode]["speedup"],
                "status": r[mode]["status"]} for fmt, r in results.items() for mode in MODES]
    if spec.layer_goal:
        fma = max(fma, machine.fma_peak(device, fma_seconds), key=lambda f: f.get("fma_peak_gflops", 0))
        layer_targets = layers.goals(rows, *spec.layer_goal, fma.get("fma_peak_gflops"))
        print(layers.format_goals(layer_targets, fma))
        targets += layer_targets
    out = args.out or report.default_out(f"{device.type}-{spec.name}")
    report.write_json(out, command=["python", "-m", "convt_ext.bench", *sys.argv[1:]], machine=info,
                      model=spec.name, batch=batch, size=spec.size, **spec.extra, calls_per_round=calls,
                      rounds=args.rounds, min_run_time_s=args.min_run_time, formats=results, targets=targets,
                      agree=all(r["agree"] for r in results.values()),
                      layers={"rows": rows, "totals": layers.totals(rows),
                              "grouped_totals": layers.totals(rows, layers.grouped), **fma},
                      gemm=convt_ext.engine_info(), conv_path=convt_ext.engine_info()["path"])
    print(f"wrote {out}")
    if failed:
        print(f"{failed} layer case(s) FAILED the check against torch", file=sys.stderr)
    return 0 if all(r["agree"] for r in results.values()) and not failed else 1
