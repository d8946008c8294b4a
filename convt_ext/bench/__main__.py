"""The command line: python -m convt_ext.bench [--quick] [...] (see --help)."""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch

import convt_ext
import convt_ext.bench

from . import chart, machine, measure, report
from .measure import DTYPES, FAILED, NOT_BUILT, TOLERANCES
from .suite import CUDA_SCALE, DIMS, HELD_OUT, OP_NAMES, SUITE, op_label, select_cases

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


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
    p = argparse.ArgumentParser(prog="python -m convt_ext.bench", description=convt_ext.bench.__doc__.split("\n\n")[0])
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--ops", default=",".join(OP_NAMES), help=f"comma list from {','.join(OP_NAMES)}")
    p.add_argument("--dims", default="1,2,3", help="comma list from 1,2,3: the shapes' dimensionality")
    p.add_argument("--shapes", help="comma list of substrings; run the shapes whose name contains one")
    p.add_argument("--quick", action="store_true",
                   help="a first look: a few small shapes, 1 round, smaller GEMMs for the peak (under a minute)")
    p.add_argument("--rounds", type=int, help="interleaved rounds per case (default 3, 1 with --quick)")
    p.add_argument("--min-run-time", type=float, help="seconds per blocked_autorange (default 0.3, 0.05 with --quick)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's, all cores)")
    p.add_argument("--no-backward", action="store_true", help="forward only")
    p.add_argument("--channels-last", action="store_true",
                   help="2-d/3-d convolutions on channels_last inputs and weights (both sides)")
    p.add_argument("--autocast", choices=["bf16", "fp16"],
                   help="float32 inputs, every call under torch.autocast to this dtype (both sides)")
    p.add_argument("--held-out", action="store_true",
                   help="the held-out layers instead of the suite (never used to tune the view path)")
    p.add_argument("--model", choices=["dcgan", "mobilenetv2", "resnet18"],
                   help="time a model instead of the suite: dcgan, a 64x64 DCGAN generator and discriminator "
                        "training step at batch 64; mobilenetv2 or resnet18, inference and a training step at "
                        "8x3x160x160 in NCHW and channels_last (--channels-last: that format alone), then every "
                        "conv layer alone (--no-backward: forward only)")
    p.add_argument("--tf32", choices=["on", "off"], default="off",
                   help="CUDA float32: TF32 for torch's convolutions and convt_ext's alike (default off)")
    p.add_argument("--gemm-engine", choices=list(convt_ext.GEMM_ENGINES),
                   help="convt_ext's GEMM engine (convt_ext.set_gemm_engine; default: its setting, 'auto')")
    p.add_argument("--conv-path", choices=list(convt_ext.CONV_PATHS),
                   help="convt_ext's convolution path (convt_ext.set_conv_path; default: its setting, 'auto')")
    p.add_argument("--out", type=Path, help="JSON path (the two PNGs go next to it)")
    p.add_argument("--list", action="store_true", help="print the suite and exit")
    p.add_argument("--overhead", action="store_true",
                   help="only the host overhead per call: a tiny CPU convolution against torch's (overhead.py)")
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



def _header(args, device, machine_info):
    """What runs against what, on which machine."""
    if device.type == "cuda":
        default = f"cuDNN {machine_info['cudnn']['version']} (torch's default; TF32 {args.tf32} for both)"
    else:
        default = (f"oneDNN {machine_info['mkldnn']['version']} where torch's dispatch picks it "
                   f"(see torch_backend in the JSON)")
    engines = convt_ext.engine_info()
    return "\n".join([
        f"convt_ext {convt_ext.__version__} vs torch {torch.__version__} on {device} "
        f"({machine_info.get('gpu') or machine_info['cpu']}, {args.dtype}"
        f"{', channels_last' if args.channels_last else ''}{', autocast ' + args.autocast if args.autocast else ''}, {torch.get_num_threads()} threads); "
        f"torch default = {default}",
        f"CPU capability {machine_info['cpu_capability']} ({machine.describe_flags(machine_info['cpu_flags'])}); "
        f"unfoldNd {machine_info['unfoldNd'] or 'not installed'}",
        f"convt_ext GEMM engine: {engines['setting']} (the rule picks {engines['rule']['float32']} for float32 "
        f"here; available: {', '.join(engines['available'])}); convolution path: {engines['path']['setting']} "
        f"(the view path {'runs' if engines['path']['view_available'] else 'does not run'} here)",
    ])


def _run(cases, args, device, dtype, started):
    """Every case, with the ceilings sampled again every PROBE_EVERY_S seconds
    between them. Returns (results, probes)."""
    results, probes, last_probe = [], [], time.perf_counter()
    for i, case in enumerate(_progress(cases)):
        if time.perf_counter() - last_probe > machine.PROBE_EVERY_S:
            probe = machine.reference_rates(device, args.quick, args.min_run_time, probe=True)
            probes.append(dict(probe, before_case=i, elapsed_s=time.perf_counter() - started))
            last_probe = time.perf_counter()
        results.append(measure.run_case(case, device, dtype, args.rounds, args.min_run_time, args.channels_last,
                                        AUTOCAST.get(args.autocast)))
    return results, probes


def main(argv=None):
    args = parse_args(argv)
    if args.list:
        for s in HELD_OUT if args.held_out else SUITE:
            print(f"{s.name:32} {s.dims}-d {','.join(s.ops):34} {'quick ' if s.quick else ''}{s.description}")
        return 0
    # Before anything is timed, in every mode (Note [The allocator state] in machine.py).
    print(machine.format_allocator(machine.set_allocator_state()))
    if args.overhead:
        from . import overhead

        return overhead.main(threads=args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gemm_engine:
        convt_ext.set_gemm_engine(args.gemm_engine)
    if args.conv_path:
        convt_ext.set_conv_path(args.conv_path)
    if args.model:
        from . import mobilenetv2, model, resnet18
        return {"dcgan": model.main, "mobilenetv2": mobilenetv2.main, "resnet18": resnet18.main}[args.model](
            args, device)
    dtype = DTYPES[args.dtype]
    if args.autocast and args.dtype != "float32":
        print("error: --autocast takes float32 inputs (leave --dtype at float32)", file=sys.stderr)
        return 2
    cases = select_cases(args.ops, args.shapes, args.quick and not args.held_out, not args.no_backward, args.dims,
                         HELD_OUT if args.held_out else None)
    if not cases:
        print(f"error: no case matches --ops {','.join(args.ops)} --dims {','.join(map(str, args.dims))} "
              f"--shapes {','.join(args.shapes)}{' --quick' if args.quick else ''} (see --list)", file=sys.stderr)
        return 2

    if device.type == "cuda":
        torch.cuda.set_device(device)
    # TF32 as --tf32 says for both sides on CUDA, the caller's flags put back after.
    with machine.tf32(args.tf32 == "on") if device.type == "cuda" else nullcontext() as tf32:
        return _suite(args, argv, device, dtype, cases, tf32)


def _suite(args, argv, device, dtype, cases, tf32):
    """Runs and reports the suite's cases: the table, the goals, the JSON and the charts."""
    started = time.perf_counter()
    machine_info = machine.machine_info(device)
    print(_header(args, device, machine_info))
    ref_start = machine.reference_rates(device, args.quick, args.min_run_time)
    print(f"ceilings: {report.format_reference(ref_start)}; {len(cases)} cases x {args.rounds} rounds")

    results, probes = _run(cases, args, device, dtype, started)

    ref_end = machine.reference_rates(device, args.quick, args.min_run_time)
    reference = machine.combine_references(ref_start, ref_end, probes, machine_info)
    for r in results:
        report.add_rates(r, reference)
    summary = report.summarize(results)
    targets = report.check_targets(summary, device.type, results, reference,
                                   {"channels_last": args.channels_last, "autocast": args.autocast},
                                   convt_ext.engine_info()["cpu_packs_bf16"])
    failures = sum(r["status"] in FAILED for r in results)
    unbuilt = sorted({op_label(r["op"], r["dims"]) for r in results if r["status"] == NOT_BUILT})
    print()
    print(report.format_table(results))
    print()
    during = f", best of {len(probes)} samples during the run {max(p['peak_gflops'] for p in probes):.1f}" if probes else ""
    print(f"ceilings (best of all measurements): {report.format_reference(reference)} "
          f"(peak at start {ref_start['peak_gflops']:.1f}, at end {ref_end['peak_gflops']:.1f}{during})")
    print("%peak = ours GFLOP/s over that fp32 peak (convolutions) or GB/s over the copy bandwidth (im2col/col2im)")
    print("speedup = other time / convt_ext time (> 1: convt_ext faster); median over shapes of the per-round medians:")
    print(report.format_summary(summary))
    if targets:
        print()
        print(report.format_targets(targets, device.type))
    if unbuilt:
        print(f"not built: this convt_ext lacks {', '.join(unbuilt)}; those cases were skipped "
              f"(rebuild: pip install --no-build-isolation .)")

    out = report.write_json(
        args.out or report.default_out(device.type),
        command=["python", "-m", "convt_ext.bench", *(sys.argv[1:] if argv is None else argv)],
        settings={
            "device": str(device), "dtype": args.dtype, "ops": args.ops, "dims": list(args.dims), "shapes": args.shapes,
            "quick": args.quick, "rounds": args.rounds, "min_run_time_s": args.min_run_time,
            "backward": not args.no_backward, "cuda_scale": CUDA_SCALE, "channels_last": args.channels_last,
            "autocast": args.autocast, "held_out": args.held_out,
            "tolerances": {"rtol": TOLERANCES[dtype][0], "atol_x_max_abs": TOLERANCES[dtype][1]},
            "tf32": tf32,
        },
        machine=machine_info,
        gemm=convt_ext.engine_info(),  # the GEMM engine setting, and per engine how many GEMMs it ran
        reference=reference,
        suite=[asdict(s) for s in (HELD_OUT if args.held_out else SUITE)],
        results=results,
        summary=summary,
        targets=targets,
        failures=failures,
        not_built=unbuilt,
        elapsed_s=time.perf_counter() - started,
    )
    print(f"\nwrote {out}")
    title = (f"convt_ext vs torch {torch.__version__}, {machine_info.get('gpu') or machine_info['cpu']}, "
             f"{torch.get_num_threads()} threads, {args.dtype}{', channels_last' if args.channels_last else ''}"
             f"{', autocast ' + args.autocast if args.autocast else ''}{', held-out layers' if args.held_out else ''}, "
             f"GEMM {convt_ext.engine_info()['setting']}, {machine_info['date'][:10]}\n"
             f"fp32 peak {reference['peak_gflops']:.0f} GFLOP/s ({reference['peak_engine']}), "
             f"copy {reference['copy_gbps']:.0f} GB/s, CPU capability {machine_info['cpu_capability']}")
    pngs = chart.plot(results, summary, out.with_suffix(".png"), title)
    if pngs:
        print(f"chart: {pngs[0]} (every case: {pngs[1]})")
    else:
        print(f"chart: none ({'nothing was timed' if chart.has_matplotlib() else 'matplotlib is not installed'})")
    if failures:
        print(f"{failures} case(s) FAILED the check against torch", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
