"""The report: every case's rates and share of the ceiling, the terminal
table, the summary per op, the project's performance goals with pass or
miss, and the JSON. All of it is built from the list of case records alone."""
from __future__ import annotations

import datetime
import itertools
import json
import math
import statistics
from pathlib import Path

from .measure import FAILED, IMPLS, NOT_BUILT, OPS, SLOW_CALL_S
from .suite import BACKWARD, CONV_OPS, DIMS, FORWARD, OP_NAMES, op_label

COLUMNS = {"convt_ext": "ours", "torch": "torch", "torch_channels_last": "torch-cl", "torch_im2col": "t-im2col", "unfoldNd": "unfoldNd"}
SCHEMA = 2  # of the JSON


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


def _align(head, rows, left, indent=""):
    """The lines of a table: a header, a rule, the rows; the first `left` columns
    left-aligned, the others (numbers) right-aligned."""
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]

    def line(cells):
        return indent + "  ".join(str(c).ljust(w) if i < left else str(c).rjust(w)
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    return [line(head), line("-" * w for w in widths)] + [line(row) for row in rows]


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
    out = _align(head, rows, left=3)  # op, dir, shape left-aligned; numbers right-aligned
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


def is_grouped(r):
    """Whether a case's layer has groups > 1 (depthwise, ResNeXt): a kind of layer with
    its own summary line and goals, apart from the dense layers of the same op."""
    return (r.get("layer") or {}).get("groups", 1) > 1


def summarize(results):
    """Per op, dims, direction and kind of layer (dense or grouped): median / min / max
    of the per-shape speedups, and of the rates and their share of the ceiling (the
    fp32 peak for convolutions)."""
    summary = []
    for op, dims, grouped, direction in itertools.product(OP_NAMES, DIMS, (False, True), (FORWARD, BACKWARD)):
        group = [r for r in results if r["op"] == op and r.get("dims", 2) == dims and r["direction"] == direction
                 and is_grouped(r) == grouped]
        if not group:
            continue
        entry = {"op": op, "dims": dims, "label": op_label(op, dims) + (" grouped" if grouped else ""),
                 "direction": direction, "grouped": grouped, "shapes": len(group),
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



# The project's performance goals, checked on every run: "pass" or "miss" by the
# measured value, "not run" where the run did not time that op (or is not the
# kind of run a goal is for). One list for the CPU and one for a GPU. Each: (op,
# dims, direction, measure, statistic over the shapes, at least, the run it is
# for). Measures: a speedup ("vs_torch": over torch's default kernel, oneDNN or
# cuDNN, on the run's layout: channels_last in a --channels-last run;
# "vs_torch_im2col": over torch's own im2col kernels), or a share of a ceiling
# in percent ("percent": of the fp32 GEMM peak or the copy bandwidth, fresh
# outputs; "percent_out": into a reused out= buffer; "percent_fma_3x3": of the
# FMA loop's peak, over the 3x3 layers with at least 64 channels in and out).
# The run: None for a default one (float32, NCHW), or the setting it needs:
# {"channels_last": True} or {"autocast": "bf16"}. A goal marked "packed bf16"
# is reported but not judged where oneDNN's ukernel has no VNNI pack for
# bfloat16 (cpublas::could_pack, true with AMX alone): there the unpacked bf16
# ukernel runs below float32 (117-170 GFLOP/s a core on a Zen 5, NOTES), so
# the bf16 goals cannot be met by a kernel, only by the rule. An eighth
# field, GROUPED, makes a goal count only the layers with groups > 1
# (depthwise, ResNeXt); the others count only the dense layers (DENSE).
NCHW, CL, BF16 = None, {"channels_last": True}, {"autocast": "bf16", "packed_bf16": True}
DENSE, GROUPED = "dense", "grouped"
TARGETS = {
    "cpu": [
        ("conv2d", 2, FORWARD, "vs_torch", "median", 1.2, NCHW),
        ("conv2d", 2, FORWARD, "vs_torch", "min", 0.9, NCHW),
        ("conv_transpose2d", 2, FORWARD, "vs_torch", "median", 1.5, NCHW),
        ("conv_transpose2d", 2, FORWARD, "vs_torch", "min", 1.0, NCHW),
        ("conv2d", 2, BACKWARD, "vs_torch", "median", 1.1, NCHW),
        ("conv_transpose2d", 2, BACKWARD, "vs_torch", "median", 1.1, NCHW),
        ("conv1d", 1, FORWARD, "vs_torch", "median", 1.0, NCHW),
        ("conv1d", 1, BACKWARD, "vs_torch", "median", 1.0, NCHW),
        ("conv_transpose1d", 1, FORWARD, "vs_torch", "median", 1.0, NCHW),
        ("conv_transpose1d", 1, BACKWARD, "vs_torch", "median", 1.0, NCHW),
        ("conv3d", 3, FORWARD, "vs_torch", "median", 1.0, NCHW),
        ("conv3d", 3, BACKWARD, "vs_torch", "median", 1.0, NCHW),
        ("conv_transpose3d", 3, FORWARD, "vs_torch", "median", 1.0, NCHW),
        ("conv_transpose3d", 3, BACKWARD, "vs_torch", "median", 1.0, NCHW),
        ("conv2d", 2, FORWARD, "vs_torch", "median", 1.0, CL),
        ("conv_transpose2d", 2, FORWARD, "vs_torch", "median", 1.0, CL),
        ("conv2d", 2, FORWARD, "percent_fma_3x3", "median", 85.0, CL),
        ("conv2d", 2, FORWARD, "vs_torch", "median", 1.0, BF16),
        ("conv_transpose2d", 2, FORWARD, "vs_torch", "median", 1.0, BF16),
        ("conv2d", 2, FORWARD, "vs_torch_im2col", "median", 2.0, NCHW),
        ("conv_transpose2d", 2, FORWARD, "vs_torch_im2col", "median", 2.0, NCHW),
        ("im2col", 2, FORWARD, "vs_torch", "median", 5.0, NCHW),
        ("col2im", 2, FORWARD, "vs_torch", "median", 5.0, NCHW),
        ("im2col", 2, FORWARD, "percent_out", "median", 50.0, NCHW),
        # Grouped layers: at least torch's speed on every layer, forward and
        # forward+backward, and 1.2x over the 2-d ones forward; the 2-d ones in
        # both memory formats. The other ops have one grouped shape each in the
        # suite, so their worst shape is that layer.
        *(goal for run in (NCHW, CL) for goal in (
            ("conv2d", 2, FORWARD, "vs_torch", "min", 1.0, run, GROUPED),
            ("conv2d", 2, FORWARD, "vs_torch", "median", 1.2, run, GROUPED),
            ("conv2d", 2, BACKWARD, "vs_torch", "min", 1.0, run, GROUPED))),
        *((op, dims, direction, "vs_torch", "min", 1.0, NCHW, GROUPED)
          for op, dims in (("conv1d", 1), ("conv3d", 3), ("conv_transpose1d", 1), ("conv_transpose2d", 2),
                           ("conv_transpose3d", 3))
          for direction in (FORWARD, BACKWARD)),
    ],
    "cuda": [
        ("conv_transpose2d", 2, FORWARD, "vs_torch", "median", 1.0, NCHW),
        ("conv2d", 2, FORWARD, "vs_torch", "median", 0.8, NCHW),
        ("im2col", 2, FORWARD, "percent", "median", 70.0, NCHW),
        ("col2im", 2, FORWARD, "percent", "median", 70.0, NCHW),
        ("im2col", 2, FORWARD, "vs_torch", "median", 3.0, NCHW),
        ("col2im", 2, FORWARD, "vs_torch", "median", 3.0, NCHW),
    ],
}


def _run_kind(settings):
    """The run's kind, as TARGETS names it."""
    settings = settings or {}
    if settings.get("autocast"):
        return {"autocast": settings["autocast"]}
    if settings.get("channels_last"):
        return {"channels_last": True}
    return None


def _for_run(run, kind):
    want = None if run is None else {k: v for k, v in run.items() if k != "packed_bf16"}
    return want == kind


def _fma_3x3(results, op, dims, direction, fma_peak, grouped=False):
    """Ours as a percent of the FMA peak, per 3x3 layer with >= 64 channels in and out
    (dense or grouped ones)."""
    out = []
    for r in results:
        if (r["op"], r.get("dims", 2), r["direction"]) != (op, dims, direction) or not fma_peak:
            continue
        if is_grouped(r) != grouped:
            continue
        s = r.get("layer") or {}
        if set(s.get("kernels", ())) == {3} and s.get("c_in", 0) >= 64 and s.get("c_out", 0) >= 64:
            value = r.get("rate", {}).get("impls", {}).get("convt_ext", {}).get("value")
            if value:
                out.append(100 * value / fma_peak)
    return out


def check_targets(summary, device_type, results=(), reference=None, settings=None, packed_bf16=True):
    """TARGETS[device_type] against the summary (the dense or the grouped layers'
    entry, as the goal says): each with its measured value (None where the run
    did not cover it) and whether it passed ("report" for a native-bf16 goal on a
    CPU without it)."""
    checked = []
    kind = _run_kind(settings)
    fma = (reference or {}).get("fma_peak_gflops")
    for op, dims, direction, measure, stat, least, run, *layers in TARGETS.get(device_type, []):
        layers = layers[0] if layers else DENSE
        entry = next((e for e in summary if e["op"] == op and e["dims"] == dims and e["direction"] == direction
                      and e.get("grouped", False) == (layers == GROUPED)), None)
        value = None
        if entry is not None and _for_run(run, kind):
            if measure.startswith("vs_"):
                value = entry.get(measure, {}).get(stat)
            elif measure == "percent_fma_3x3":
                values = _fma_3x3(results, op, dims, direction, fma, layers == GROUPED)
                value = _stats(values)[stat] if values else None
            else:
                impl = "convt_ext_out" if measure == "percent_out" else "convt_ext"
                value = entry.get("rate", {}).get(impl, {}).get("percent_of_ceiling", {}).get(stat)
        status = "not run" if value is None else ("pass" if value >= least else "miss")
        if value is not None and run and run.get("packed_bf16") and not packed_bf16:
            status = "report"
        checked.append({"op": op, "dims": dims, "direction": direction, "layers": layers, "measure": measure,
                        "statistic": stat, "at_least": least,
                        "run": {k: v for k, v in (run or {}).items() if k != "packed_bf16"},
                        "measured": value, "status": status})
    return checked


def describe_target(t):
    """A goal in words: "median speedup over torch's default kernel"."""
    stat = {"median": "median", "min": "worst shape's"}[t["statistic"]]
    ceiling = "copy bandwidth" if t["op"] not in CONV_OPS else "fp32 peak"
    what = {"vs_torch": "speedup over torch's default kernel",
            "vs_torch_im2col": "speedup over torch's own im2col kernel",
            "percent": f"share of the {ceiling}",
            "percent_out": f"share of the {ceiling}, into a reused out= buffer",
            "percent_fma_3x3": "share of the FMA peak, 3x3 layers of >= 64 channels"}[t["measure"]]
    run = t.get("run") or {}
    where = (" (channels-last in and out)" if run.get("channels_last") else
             f" (under autocast {run['autocast']}, where the ukernel packs bf16)" if run.get("autocast") else "")
    layers = " on grouped layers (groups > 1)" if t.get("layers") == GROUPED else ""
    return f"{stat} {what}{layers}{where}"


def format_targets(checked, device_type):
    """The goals as a table, under a heading that counts those met."""
    def value(t, v):
        return f"{v:.0f}%" if t["measure"].startswith("percent") else f"{v:.2f}x"

    met = sum(t["status"] == "pass" for t in checked)
    rows = [(t["status"], op_label(t["op"], t["dims"]), t["direction"], describe_target(t),
             f">= {value(t, t['at_least'])}", "-" if t["measured"] is None else value(t, t["measured"]))
            for t in checked]
    device = "a GPU" if device_type == "cuda" else "the CPU"
    return "\n".join([f"performance goals on {device}: {met} of {len(checked)} met "
                      f"(speedup = torch's time / ours: > 1 when convt_ext is faster)",
                      *_align(("result", "op", "direction", "goal", "at least", "measured"), rows, left=4,
                              indent="  ")])


def format_summary(summary):
    out = []
    for e in summary:
        parts = []
        for key, what in (("torch", "torch default"), ("torch_channels_last", "torch on channels_last"),
                          ("torch_im2col", "torch im2col kernel"), ("unfoldNd", "unfoldNd")):
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


def format_reference(ref):
    engines = ", ".join(f"{e} {v:.1f}" for e, v in ref.get("peak_by_engine", {}).items())
    m, k, n = ref["peak_shape"]
    fma = f", FMA loop {ref['fma_peak_gflops']:.1f} GFLOP/s ({ref['fma_isa']})" if ref.get("fma_peak_gflops") else ""
    return (f"fp32 peak {ref['peak_gflops']:.1f} GFLOP/s ({ref['peak_engine']}, {m}x{k}x{n} GEMM"
            f"{'; best per engine: ' + engines if engines else ''}){fma}, copy {ref['copy_gbps']:.1f} GB/s")


def default_out(device_type):
    """benchmarks/results/<device>-<stamp>.json in a repo checkout, else ./convt_ext-bench-<device>.json."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        folder = root / "benchmarks" / "results"
        if folder.is_dir():
            return folder / f"{device_type}-{stamp}.json"
    return Path.cwd() / f"convt_ext-bench-{device_type}.json"


def write_json(path, **parts):
    """The run's JSON: schema, then the parts in the order given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"schema": SCHEMA, **parts}, indent=1))
    return path
