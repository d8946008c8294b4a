"""The figures of a run, two PNGs next to its JSON.

The chart (x.png) is one compact figure to take in at a glance: a row per op
and direction, grouped by op; on the left the median speedup over each of
torch's kernels with its range (the slowest and the fastest shape), on the
right ours and torch's share of the ceiling (the fp32 FMA peak for the
convolutions, the copy bandwidth for im2col/col2im). The appendix
(x-cases.png) draws every case the same way, its range being the rounds'."""
from __future__ import annotations

from .suite import FORWARD, UNFOLD_OPS, op_label

# The comparators, as the chart names and draws them: (key, legend, marker, color).
SERIES = (
    ("torch", "torch's default kernel", "o", "tab:blue"),
    ("torch_channels_last", "torch on channels_last", "v", "tab:purple"),
    ("torch_im2col", "torch's own im2col kernel", "D", "tab:orange"),
    ("unfoldNd", "unfoldNd", "s", "tab:green"),
)
OURS, THEIRS = "tab:red", "black"


def has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def appendix_path(path):
    """Where the appendix goes: x.png -> x-cases.png."""
    return path.with_name(f"{path.stem}-cases{path.suffix}")


def plot(results, summary, path, title):
    """The chart at `path` and the appendix next to it; returns both paths,
    or None when nothing was timed or matplotlib is missing (with a note)."""
    if not has_matplotlib():
        print("note: matplotlib is not installed, so no chart (pip install matplotlib).")
        return None
    rows = summary_rows(summary)
    if not rows:
        return None
    _draw(rows, path, title, "median over shapes; lines: slowest to fastest shape")
    appendix = appendix_path(path)
    _draw(case_rows(results), appendix, "every case: " + title, "lines: slowest to fastest round")
    return path, appendix


def _span(stats):
    """(median, low, high) of a {median, min, max} entry, or None."""
    return (stats["median"], stats["min"], stats["max"]) if stats else None


def summary_rows(summary):
    """A row per op, dims and direction that was timed."""
    rows = []
    for e in summary:
        rate = e.get("rate", {})
        speedups = {key: _span(e.get(f"vs_{key}")) for key, *_ in SERIES}
        if not any(speedups.values()) and "convt_ext" not in rate:
            continue
        label = e["label"] if e["op"] in UNFOLD_OPS else f"{e['label']} {'fwd' if e['direction'] == FORWARD else 'fwd+bwd'}"
        rows.append({
            "label": label, "group": e["op"], "speedups": speedups,
            "ours": _span(rate.get("convt_ext", {}).get("percent_of_ceiling")),
            "torch": _span(rate.get("torch", {}).get("percent_of_ceiling")),
        })
    return rows


def case_rows(results):
    """A row per timed case; its ranges are those of the rounds."""
    rows = []
    for r in results:
        if "speedup" not in r:
            continue
        speedups = {}
        for key, *_ in SERIES:
            s = r["speedup"].get(key)
            if s:
                rounds = s.get("rounds") or [s["median"]]
                speedups[key] = (s["median"], min(rounds), max(rounds))
        pct = {key: r.get("rate", {}).get("impls", {}).get(key, {}).get("percent_of_ceiling")
               for key in ("convt_ext", "torch")}
        direction = "fwd" if r["direction"] == FORWARD else "fwd+bwd"
        rows.append({
            "label": f"{op_label(r['op'], r.get('dims', 2))} {direction} {r['shape']}", "group": r["op"],
            "speedups": speedups,
            "ours": (pct["convt_ext"],) * 3 if pct["convt_ext"] else None,
            "torch": (pct["torch"],) * 3 if pct["torch"] else None,
        })
    return rows


def _positions(rows, gap=0.7):
    """y of every row, top down, with a gap between groups; and each group's (first, last) y."""
    ys, spans, y = [], [], 0.0
    for i, row in enumerate(rows):
        if i and row["group"] != rows[i - 1]["group"]:
            y += gap
        if not spans or row["group"] != rows[i - 1]["group"]:
            spans.append([y, y])
        spans[-1][1] = y
        ys.append(y)
        y += 1
    return ys, spans


def _draw(rows, path, title, ranges):
    from matplotlib import ticker
    from matplotlib.figure import Figure

    ys, spans = _positions(rows)
    series = [s for s in SERIES if any(row["speedups"].get(s[0]) for row in rows)]
    fig = Figure(figsize=(11, 1.5 + 0.22 * (ys[-1] + 1)), layout="constrained")
    left, right = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": (3, 2)})
    for ax in (left, right):
        for i, (top, bottom) in enumerate(spans):  # a band per op group
            if i % 2 == 0:
                ax.axhspan(top - 0.5, bottom + 0.5, color="0.93", zorder=0)
        ax.grid(axis="x", color="0.85", linewidth=0.6, zorder=0)
        ax.tick_params(labelsize=7)

    step = 0.22
    speeds = []
    for i, (key, legend, marker, color) in enumerate(series):
        offset = (i - (len(series) - 1) / 2) * step
        pts = [(y + offset, row["speedups"][key]) for y, row in zip(ys, rows) if row["speedups"].get(key)]
        if not pts:
            continue
        y, (mid, lo, hi) = [p[0] for p in pts], zip(*[p[1] for p in pts])
        mid, lo, hi = list(mid), list(lo), list(hi)
        speeds += lo + hi
        left.hlines(y, lo, hi, color=color, linewidth=2.2 if key == "torch" else 1.4, alpha=0.55, zorder=2)
        left.scatter(mid, y, marker=marker, s=26 if key == "torch" else 18, color=color, zorder=3,
                     label=f"vs {legend}")
        if key == "torch":  # the headline figure, written out in a column at the right edge
            for yy, m in zip(y, mid):
                left.annotate(f"{m:.2f}x", (1, yy - offset), xycoords=("axes fraction", "data"), xytext=(-3, 0),
                              textcoords="offset points", ha="right", va="center", fontsize=6.5, color=color)
            left.annotate("vs torch", (1, 1), xycoords="axes fraction", xytext=(-3, 2), textcoords="offset points",
                          ha="right", va="bottom", fontsize=6.5, color=color)
    left.axvline(1.0, color="black", linewidth=0.8, zorder=2.5)
    left.set_xscale("log")
    if speeds:
        lo, hi = min(speeds), max(speeds)
        left.set_xlim(min(lo, 1.0) / 1.25, max(hi, 1.0) * 3.2)  # room for the column of medians
    left.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    left.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    left.xaxis.set_minor_formatter(ticker.NullFormatter())
    left.set_xlabel("speedup of convt_ext: their time / ours\n(> 1: convt_ext is faster)", fontsize=8)
    left.set_yticks(ys, [row["label"] for row in rows], fontsize=7)
    left.set_ylim(ys[-1] + 0.8, -0.8)  # top down, no margins beyond the rows

    for key, color, legend in (("ours", OURS, "convt_ext"), ("torch", THEIRS, "torch's default")):
        pts = [(y, row[key]) for y, row in zip(ys, rows) if row[key]]
        if not pts:
            continue
        y = [p[0] for p in pts]
        mid, lo, hi = (list(v) for v in zip(*[p[1] for p in pts]))
        if key == "ours":
            right.barh(y, mid, height=0.55, color=OURS, alpha=0.35, zorder=2, label=legend)
            right.hlines(y, lo, hi, color=OURS, linewidth=1.4, zorder=3)
            for yy, m, h in zip(y, mid, hi):
                right.annotate(f"{m:.0f}%", (h, yy), xytext=(4, 0), textcoords="offset points", va="center",
                               fontsize=6.5, color=OURS)
        else:
            right.scatter(mid, y, marker="|", s=90, color=THEIRS, zorder=4, label=legend)
    shares = [v for row in rows for key in ("ours", "torch") if row[key] for v in row[key]]
    right.set_xlim(0, max([100.0, *shares]) * 1.08)  # a busy moment's ceiling may sit below a case
    right.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}%"))
    right.set_xlabel("share of the ceiling: the fp32 FMA peak (convolutions),\nthe copy bandwidth (im2col/col2im)",
                     fontsize=8)
    fig.suptitle(title, fontsize=8.5)
    fig.legend(loc="outside lower center", ncol=len(series) + 2, fontsize=7, frameon=False,
               title=ranges, title_fontsize=7)
    fig.savefig(path, dpi=110)
    return path
