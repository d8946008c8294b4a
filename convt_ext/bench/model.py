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
modes' own, shared with mobilenetv2.py."""
from __future__ import annotations

import statistics
import sys
import time

import torch
from torch import nn

import convt_ext
import convt_ext.nn

from . import machine, report

NZ, NGF, NDF, BATCH = 100, 64, 64, 64
TARGET = 1.0  # ours at least as fast as torch's step, float32


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
