"""The GPU check's benchmark: a subset of the suite under a time budget.

    python -m convt_ext.bench.gpu --out DIR [--budget SECONDS]    # on the GPU
    python -m convt_ext.bench.gpu --out DIR --device cpu --smoke   # the same steps on tiny shapes, on the CPU

conv2d and conv_transpose2d (forward, forward+backward) and 2-d im2col/col2im,
each against torch's default kernel (cuDNN on CUDA) and its own im2col
kernels, with TF32 off and on for both sides (im2col/col2im move values
without arithmetic, so they run once, with TF32 off); and the ceilings every
rate is compared with: the fp32 GEMM peak under each TF32 setting, the copy
bandwidth on the device and, on CUDA, between pinned host memory and the GPU.

The cases run in an order that reaches every op early (a round robin over
the ops, the --quick shapes first), each convolution under both settings in
turn, and stop once the budget is spent; the cases left out are counted.
The JSON is rewritten after every case, so a run stopped from outside keeps
what it measured. Writes DIR/bench.json and, per TF32 setting, the charts
DIR/bench-tf32-{off,on}.png (with their appendix, -cases.png)."""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

import convt_ext

from . import chart, machine, measure, report
from .measure import FAILED
from .suite import BACKWARD, CONV_OPS, FORWARD, Case, Shape, has_backward, select_cases

OPS = ("conv2d", "conv_transpose2d", "im2col", "col2im")
SETTINGS = ("off", "on")
# Under TF32 both sides round their inputs to 10 mantissa bits, each in its own order of
# summation: the difference is of the order of 2^-11 of the output's scale, not float32's 1e-4.
TF32_TOLERANCE = (1e-2, 1e-2)  # (rtol, atol relative to the largest magnitude), as measure.TOLERANCES
# --smoke: every op of the subset, each in a second on the CPU.
SMOKE = [
    Shape("smoke-3x3-8-12", "smoke: 3x3, 8->8 at 12x12", ("conv2d", "im2col", "col2im"), 2, 8, 8, 12, 3, padding=1, cuda_n=2),
    Shape("smoke-4x4-s2-8to4-6", "smoke: 4x4 s2 p1 transposed, 8->4, 6->12", ("conv_transpose2d", "col2im"), 2, 8, 4, 6, 4, 2, 1,
          transposed=True, cuda_n=2),
]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m convt_ext.bench.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for bench.json and the charts")
    p.add_argument("--budget", type=float, default=90.0, help="seconds for the cases (default 90)")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available, else cpu)")
    p.add_argument("--smoke", action="store_true", help="two tiny shapes instead of the suite's (checks the steps)")
    p.add_argument("--min-run-time", type=float, default=0.05, help="seconds per blocked_autorange (default 0.05)")
    args = p.parse_args(argv)
    if args.budget <= 0 or args.min_run_time <= 0:
        p.error("--budget and --min-run-time must be positive")
    return args


def ordered_cases(smoke):
    """The subset's cases, a round robin over OPS, each op's --quick shapes first."""
    if smoke:
        per_op = [[Case(op, s, d) for s in SMOKE if op in s.ops
                   for d in ((FORWARD, BACKWARD) if has_backward(op) else (FORWARD,))] for op in OPS]
    else:
        per_op = [sorted(select_cases([op], [], False, True, (2,)), key=lambda c: not c.shape.quick) for op in OPS]
    cases = []
    for i in range(max(map(len, per_op))):
        cases += [cases_of_op[i] for cases_of_op in per_op if i < len(cases_of_op)]
    return cases


@contextmanager
def tf32(device, on):
    """TF32 on or off for both sides (on CUDA), with float32 checked to TF32_TOLERANCE while on."""
    saved = measure.TOLERANCES[torch.float32]
    with machine.tf32(on) if device.type == "cuda" else nullcontext() as flags:
        if on:
            measure.TOLERANCES[torch.float32] = TF32_TOLERANCE
        try:
            yield flags
        finally:
            measure.TOLERANCES[torch.float32] = saved


def transfer_rates(device, min_run_time):
    """GB/s of 64 MiB copies between pinned host memory and the GPU (None on the CPU)."""
    if device.type != "cuda":
        return None
    host = torch.ones(64 * 2**20, dtype=torch.uint8).pin_memory()
    gpu = torch.empty_like(host, device=device)
    rates = {}
    for name, fn in (("host_to_device_gbps", lambda: gpu.copy_(host, non_blocking=True)),
                     ("device_to_host_gbps", lambda: host.copy_(gpu, non_blocking=True))):
        _, times = measure.time_call(fn, max(min_run_time, 0.2))
        rates[name] = host.nbytes / min(times) / 1e9
    return rates


def run(args):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("error: --device cuda, but torch.cuda.is_available() is False", file=sys.stderr)
            return 2
        torch.cuda.set_device(device)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    info = machine.machine_info(device)
    cases = ordered_cases(args.smoke)
    passes = {}
    for setting in SETTINGS:
        with tf32(device, setting == "on") as flags:
            ref = machine.reference_rates(device, True, args.min_run_time)
        passes[setting] = {"tf32": flags, "reference": machine.combine_references(ref, ref, [], info), "results": []}
        print(f"TF32 {setting}: ceilings {report.format_reference(passes[setting]['reference'])}")
    transfers = transfer_rates(device, args.min_run_time)
    if transfers:
        print("pinned host <-> GPU: " + ", ".join(f"{k[:-5]} {v:.1f} GB/s" for k, v in transfers.items()))
    print(f"{len(cases)} cases on {info.get('gpu') or info['cpu']}, budget {args.budget:g} s")

    left_out = []
    out = args.out / "bench.json"
    budget_from = time.perf_counter()
    for i, case in enumerate(cases):
        if i and time.perf_counter() - budget_from > args.budget:  # the first case runs whatever the budget
            left_out.append(case.label)
            continue
        for setting in SETTINGS if case.op in CONV_OPS else SETTINGS[:1]:
            with tf32(device, setting == "on"):
                try:
                    r = measure.run_case(case, device, torch.float32, 1, args.min_run_time)
                except Exception as exc:  # noqa: BLE001 - e.g. out of memory: reported, and the run goes on
                    r = {"op": case.op, "dims": 2, "direction": case.direction, "shape": case.shape.name,
                         "status": "error", "error": f"{type(exc).__name__}: {exc}".splitlines()[0], "impls": {}}
            if "flops" in r or "bytes" in r:
                report.add_rates(r, passes[setting]["reference"])
            passes[setting]["results"].append(r)
            status = r["status"] + (f" ({r['error']})" if r["status"] != "ok" else "")
            print(f"[{time.perf_counter() - started:5.1f} s] TF32 {setting:3} {case.label}: {status}", flush=True)
        _write(out, args, device, info, passes, transfers, left_out, started)

    failures = 0
    for setting, p in passes.items():
        p["summary"] = report.summarize(p["results"])
        failures += sum(r["status"] in FAILED for r in p["results"])
        print(f"\n--- TF32 {setting} ---")
        print(report.format_table(p["results"]))
        print(report.format_summary(p["summary"]))
        title = (f"convt_ext vs torch {torch.__version__}, {info.get('gpu') or info['cpu']}, float32, TF32 {setting}, "
                 f"{info['date'][:10]}\nfp32 peak {p['reference']['peak_gflops']:.0f} GFLOP/s, "
                 f"copy {p['reference']['copy_gbps']:.0f} GB/s")
        pngs = chart.plot(p["results"], p["summary"], args.out / f"bench-tf32-{setting}.png", title)
        print(f"chart: {pngs[0] if pngs else 'none (nothing was timed)'}")
    _write(out, args, device, info, passes, transfers, left_out, started)
    timed = sum(len(p["results"]) for p in passes.values())
    print(f"\nbench: {timed} runs of {len(cases)} cases, {failures} failed, {len(left_out)} cases left out "
          f"by the {args.budget:g} s budget; wrote {out}")
    return 1 if failures else 0


def _write(out, args, device, info, passes, transfers, left_out, started):
    report.write_json(
        out,
        command=["python", "-m", "convt_ext.bench.gpu", *sys.argv[1:]],
        settings={"device": str(device), "dtype": "float32", "ops": list(OPS), "smoke": args.smoke,
                  "budget_s": args.budget, "rounds": 1, "min_run_time_s": args.min_run_time,
                  "tf32_tolerance": {"rtol": TF32_TOLERANCE[0], "atol_x_max_abs": TF32_TOLERANCE[1]}},
        machine=info,
        gemm=convt_ext.engine_info(),
        transfers=transfers,
        tf32=passes,
        left_out=left_out,
        elapsed_s=time.perf_counter() - started,
    )


def main(argv=None):
    args = parse_args(argv)
    # Before anything is timed (Note [The allocator state] in machine.py).
    print(machine.format_allocator(machine.set_allocator_state()))
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
