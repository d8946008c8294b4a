"""Every convolution of a model alone: torch's F.conv{d}d / F.conv_transpose{d}d
against convt_ext's on the input shape the layer gets in the model, forward
and forward+backward, in NCHW and channels_last (python -m convt_ext.bench
--model mobilenetv2 prints the table after the model's own times).

A model mode hands over a list of (name, module, input shape), which
conv_layers collects with hooks on one forward. Each layer becomes a suite
Shape and each case runs through measure.run_case, so a layer is checked and
timed exactly as the suite's layers are (interleaved rounds, medians,
speedup = torch's time / ours). Layers of one geometry (a model's repeated
blocks) are timed once and counted as often as they occur. A model mode may
hold each layer's forward to a goal (goals): at least torch's speed, or a
share of the FMA peak where that is the lower rate."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from . import measure, report
from .suite import BACKWARD, FORWARD, Case, Shape

FORMATS = ("nchw", "channels_last")
SHORT = {("nchw", FORWARD): "fwd", ("nchw", BACKWARD): "fwd+bwd",
         ("channels_last", FORWARD): "cl fwd", ("channels_last", BACKWARD): "cl fwd+bwd"}
TIMED = ("convt_ext", "torch")  # the other comparators of the suite would only add time here


def conv_layers(model, *inputs):
    """[(name, module, input shape)] of every convolution in `model`, in the order a
    forward of `inputs` (under no_grad) calls them; a module called twice is listed twice."""
    found, hooks = [], []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            hooks.append(module.register_forward_pre_hook(
                lambda m, args, name=name: found.append((name, m, tuple(args[0].shape)))))
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return found


def layer_shape(name, module, input_shape):
    """The suite's Shape of a conv module (torch's or convt_ext's, any dims, direct or
    transposed) on a batched input of `input_shape`: (N, C_in, *size). A padding_mode
    other than zeros is timed as zeros: the convolution is the same, without the pad."""
    if isinstance(module.padding, str):
        raise ValueError(f"{name}: padding={module.padding!r}; the table takes numeric padding")
    n, _, *size = input_shape
    kernel = tuple(module.kernel_size)
    op = f"conv_transpose{len(kernel)}d" if module.transposed else f"conv{len(kernel)}d"
    return Shape(name, f"{name}: a model's {op}", (op,), n, module.in_channels, module.out_channels,
                 tuple(size), kernel, tuple(module.stride), tuple(module.padding),
                 tuple(module.output_padding), tuple(module.dilation), module.groups, module.transposed,
                 module.bias is not None, cuda_n=n, dims=len(kernel))


def _geometry(shape):
    """What decides a layer's time: everything but its name."""
    return dataclasses.replace(shape, name="", description="")


def time_layers(layers, device, rounds, min_run_time, formats=FORMATS, backward=True):
    """Each distinct geometry of `layers` [(name, module, input shape)], checked and timed
    in every format of `formats` and direction. Returns the rows: {names, count, layer
    (the Shape's fields), cases: {format: {direction: run_case's record}}}."""
    rows = {}
    for name, module, input_shape in layers:
        shape = layer_shape(name, module, input_shape)
        row = rows.setdefault(_geometry(shape), {"names": [], "shape": shape})
        row["names"].append(name)
    out = []
    for row in rows.values():
        shape, cases = row.pop("shape"), {}
        for fmt in formats:
            if fmt == "channels_last" and shape.dims == 1:
                continue  # no channels_last format in 1-d: the same case as NCHW
            for direction in (FORWARD, BACKWARD) if backward else (FORWARD,):
                case = Case(shape.conv, shape, direction)
                cases.setdefault(fmt, {})[direction] = measure.run_case(
                    case, device, torch.float32, rounds, min_run_time, fmt == "channels_last", impls=TIMED)
        out.append({**row, "count": len(row["names"]), "layer": dataclasses.asdict(shape), "cases": cases})
    return out


def grouped(layer):
    """Whether a layer (a row's "layer") has groups > 1: depthwise, ResNeXt."""
    return layer["groups"] > 1


def totals(rows, pick=lambda layer: True):
    """{format: {direction: {torch_s, convt_ext_s, speedup}}} over the rows whose layer
    `pick` takes, each row's times counted as often as its geometry occurs: the model's
    convolution time, ours against torch's. None where some layer was not timed."""
    times = {}
    for row in (r for r in rows if pick(r["layer"])):
        for fmt, by_direction in row["cases"].items():
            for direction, record in by_direction.items():
                for impl in TIMED:
                    t = record.get("impls", {}).get(impl, {}).get("median_s")
                    times.setdefault((fmt, direction, impl), []).append(None if t is None else row["count"] * t)
    sums = {}
    for (fmt, direction, impl), values in times.items():
        entry = sums.setdefault(fmt, {}).setdefault(direction, {})
        entry[f"{impl}_s"] = None if None in values else sum(values)
    for entry in (e for by_direction in sums.values() for e in by_direction.values()):
        ok = entry["torch_s"] is not None and entry["convt_ext_s"]
        entry["speedup"] = entry["torch_s"] / entry["convt_ext_s"] if ok else None
    return sums


def _ratio(record):
    if record is None:
        return "-"
    if record["status"] != "ok":
        return record["status"]
    return report._fmt_x(record["speedup"]["torch"]["median"])


def _x(v):
    return "x".join(map(str, v))


def format_table(rows):
    """The table: a row per geometry (its first layer's name, how many layers share it,
    channels, kernel, stride, groups, input size, then the speedup per format and
    direction), then the time-weighted totals over all layers and over the grouped ones."""
    columns = [(fmt, d) for fmt in FORMATS for d in (FORWARD, BACKWARD)
               if any(d in r["cases"].get(fmt, {}) for r in rows)]
    body = []
    for r in rows:
        s = r["layer"]
        body.append((r["names"][0], r["count"], f"{s['c_in']}->{s['c_out']}", _x(s["kernel"]), _x(s["stride"]),
                     s["groups"], _x(s["size"]), *(_ratio(r["cases"].get(fmt, {}).get(d)) for fmt, d in columns)))
    for what, pick in (("all", lambda layer: True), ("grouped", grouped)):
        n = sum(r["count"] for r in rows if pick(r["layer"]))
        if n:
            sums = totals(rows, pick)
            body.append((f"{what} {n} conv layers, time-weighted", n, "", "", "", "", "",
                         *(report._fmt_x(sums.get(fmt, {}).get(d, {}).get("speedup")) for fmt, d in columns)))
    head = ("layer", "n", "channels", "kernel", "stride", "groups", "input", *(SHORT[c] for c in columns))
    return "\n".join(report._align(head, body, left=1, indent="  ") + [
        "  speedup = torch's time / ours (> 1: convt_ext faster), median of the rounds; n: the model's layers of "
        "that geometry (timed once); time-weighted: the sum of torch's times over the sum of ours, each layer "
        "counted n times"])


def _percent_fma(record, fma_peak):
    """Ours as a percent of the FMA peak (GFLOP/s) on one timed case, None where untimed."""
    ours = record.get("impls", {}).get("convt_ext", {}).get("median_s")
    return 100 * record["flops"] / ours / 1e9 / fma_peak if ours and fma_peak and "flops" in record else None


def goals(rows, at_least, fma_percent, fma_peak):
    """Each geometry's forward in each format against its goal: ours at least the lower
    of `at_least` times torch's rate and `fma_percent` percent of the FMA peak (fma_peak
    GFLOP/s; None where not measured, e.g. on a GPU: then torch's alone), i.e. a pass
    when either holds. A layer that failed its check keeps that status. One entry per
    row and format, in the JSON's "targets" beside the model's own."""
    out = []
    for r in rows:
        for fmt, by_direction in r["cases"].items():
            record = by_direction.get(FORWARD)
            if record is None:
                continue
            ok = record["status"] == "ok"
            ratio = record["speedup"]["torch"]["median"] if ok else None
            pct = _percent_fma(record, fma_peak) if ok else None
            met = ok and (ratio >= at_least or (pct is not None and pct >= fma_percent))
            out.append({"layer": r["names"][0], "names": r["names"], "format": fmt, "direction": FORWARD,
                        "at_least": at_least, "or_percent_fma": fma_percent if fma_peak else None,
                        "measured": ratio, "percent_fma": pct,
                        "status": record["status"] if not ok else ("pass" if met else "miss")})
    return out


def format_goals(checked, fma):
    """The layers' goals as a table, under a heading that counts those met; `fma`:
    machine.fma_peak's {fma_peak_gflops, fma_isa}, empty where not measured."""
    peak = fma.get("fma_peak_gflops")
    def goal(t):
        x = report._fmt_x(t["at_least"])
        return f">= min({x}, {t['or_percent_fma']:.0f}% FMA)" if t["or_percent_fma"] else f">= {x}"

    rows = [(t["layer"], len(t["names"]), t["format"], report._fmt_x(t["measured"]),
             "-" if t["percent_fma"] is None else f"{t['percent_fma']:.0f}%", goal(t), t["status"]) for t in checked]
    of = f"the FMA peak {peak:.1f} GFLOP/s ({fma['fma_isa']})" if peak else "no FMA peak here: torch's speed alone"
    return "\n".join([
        f"\nper-layer goals, forward: {sum(t['status'] == 'pass' for t in checked)} of {len(checked)} met "
        f"(ours at least the lower of torch's rate and a share of {of})",
        *report._align(("layer", "n", "format", "speedup", "%FMA", "goal", "result"), rows, left=3, indent="  ")])
