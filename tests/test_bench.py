"""Tests of the benchmark tool (python -m convt_ext.bench): a quick run end to
end, the ceilings (fp32 peak, copy bandwidth), the suite's coverage and
geometry (1-d, 2-d and 3-d), torch's references, the chart, that a wrong
result is caught, not timed, and that an op the build lacks is "not built"."""
import contextlib
import io
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import convt_ext
from convt_ext.bench import __main__ as cli
from convt_ext.bench import chart, layers, machine, measure, mobilenetv2, resnet18, suite
from convt_ext.bench import report as bench_report
from conftest import reset_tf32

SMALL = "dcgan-64to3-32"  # a --quick shape with both im2col and conv_transpose2d
QUICK = ["--quick", "--ops", "im2col,conv_transpose2d", "--shapes", SMALL, "--min-run-time", "0.02"]
README = Path(__file__).resolve().parents[1] / "README.md"  # the checkout's, beside tests/


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401  (an optional extra of the package, installed by the README's command)
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "x.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli.main(QUICK + ["--out", str(out)])
    return code, out, stdout.getvalue()


def test_quick_run_writes_a_complete_report(quick_run):
    code, out, _ = quick_run
    assert code == 0
    report = json.loads(out.read_text())
    assert report["schema"] == 2
    machine = report["machine"]
    for key in ("cpu", "torch", "torch_threads", "convt_ext", "date", "mkldnn", "cpu_capability"):
        assert machine[key] is not None, key
    assert machine["convt_ext"]["version"] == convt_ext.__version__
    assert machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    if Path("/proc/cpuinfo").exists():
        flags = machine["cpu_flags"]
        assert all(isinstance(flags[f], bool) for f in ("avx2", "avx512f", "fma"))
        assert flags["avx512f"] == ("avx512f" in flags["avx512"])
    assert report["failures"] == 0 and report["not_built"] == []
    results = report["results"]
    measured = {(r["op"], r["direction"]) for r in results}
    assert measured == {("im2col", "forward"), ("conv_transpose2d", "forward"), ("conv_transpose2d", "forward+backward")}
    for r in results:
        assert r["shape"] == SMALL and r["dims"] == 2
        assert r["status"] == "ok"
        assert r["impls"]["convt_ext"]["status"] == "ok"
        assert r["speedup"]["torch"]["median"] > 0
        assert all(t > 0 for t in r["impls"]["convt_ext"]["round_median_s"])
        assert r["rate"]["value"] > 0
        if r["op"] == "conv_transpose2d":  # groups=1: torch's slow_conv_transpose2d applies
            assert r["impls"]["torch_im2col"]["status"] in ("ok", "n/a")
        else:  # unfoldNd is an optional comparator
            assert r["impls"]["unfoldNd"]["status"] == ("ok" if measure.unfoldnd() else "n/a")
    assert {(s["op"], s["direction"]) for s in report["summary"]} == measured


def test_the_peak_is_the_best_gemm_of_torchs_engines(quick_run):
    _, out, stdout = quick_run
    ref = json.loads(out.read_text())["reference"]
    rates = [g["gflops"] for g in ref["gemm"] if g["gflops"]]
    engines = {g["engine"] for g in ref["gemm"] if g["gflops"]}
    assert len({(g["m"], g["k"], g["n"]) for g in ref["gemm"]}) >= 2, "a few shapes"
    assert ref["peak_gflops"] == max(rates) > 0
    assert ref["peak_by_engine"][ref["peak_engine"]] == ref["peak_gflops"]
    assert engines & {"MKL", "BLAS"}
    if torch.backends.mkldnn.is_available():
        assert "oneDNN" in engines
    for g in ref["gemm"]:  # the best of the measurements at the start, at the end and between cases
        assert g["gflops"] == max(v for v in (g["start"], g["end"], g["during"]) if v)
    assert ref["copy_gbps"] > 0
    assert ref["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert f"fp32 peak {ref['peak_gflops']:.1f} GFLOP/s ({ref['peak_engine']}" in stdout


def test_every_convolution_reports_its_share_of_the_peak(quick_run):
    _, out, stdout = quick_run
    report = json.loads(out.read_text())
    peak, copy = report["reference"]["peak_gflops"], report["reference"]["copy_gbps"]
    for r in report["results"]:
        rate = r["rate"]
        conv = r["op"] in suite.CONV_OPS
        assert rate["unit"] == ("GFLOP/s" if conv else "GB/s")
        assert rate["ceiling_value"] == (peak if conv else copy)
        for key, e in rate["impls"].items():
            work = r["flops"] if conv else r["bytes"]
            seconds = r["out_median_s"] if key == "convt_ext_out" else r["impls"][key]["median_s"]
            assert e["value"] == pytest.approx(work / seconds / 1e9)
            assert e["percent_of_ceiling"] == pytest.approx(100 * e["value"] / rate["ceiling_value"])
        assert rate["percent_of_ceiling"] == rate["impls"]["convt_ext"]["percent_of_ceiling"]
    for s in report["summary"]:
        pct = s["rate"]["convt_ext"]["percent_of_ceiling"]
        assert pct["min"] <= pct["median"] <= pct["max"]
        assert s["rate"]["ceiling"] == ("peak_gflops" if s["op"] in suite.CONV_OPS else "copy_gbps")
    assert re.search(r"conv_transpose2d forward: .*ours [\d.]+ GFLOP/s = \d+% of peak", stdout)
    assert re.search(r"im2col forward: .*ours [\d.]+ GB/s = \d+% of copy bandwidth", stdout)
    # im2col/col2im are also timed into a reused out= buffer.
    assert all(r["out_median_s"] > 0 for r in report["results"] if r["op"] in suite.UNFOLD_OPS and r["direction"] == suite.FORWARD)
    assert re.search(r"im2col forward: .*into a reused out= buffer \d+%", stdout)


def test_the_chart_comes_by_default(quick_run):
    """With matplotlib (which the README's command installs) every run writes two PNGs next to
    the JSON, the chart and its appendix of every case, and ends by printing their paths; without
    it, the run still succeeds and says why there is none."""
    code, out, stdout = quick_run
    png, appendix = out.with_suffix(".png"), out.with_name(f"{out.stem}-cases.png")
    last = stdout.rstrip().splitlines()[-1]
    if _has_matplotlib():
        for path in (png, appendix):
            assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
        assert last == f"chart: {png} (every case: {appendix})"
    else:
        assert code == 0 and not png.exists() and not appendix.exists()
        assert last == "chart: none (matplotlib is not installed)"


def test_the_chart_has_a_row_per_op_and_the_appendix_one_per_case(quick_run):
    """The chart's rows are the summary's (an op, its dims and direction: medians with the
    range over shapes), the appendix's the timed cases; each row's figures are the JSON's."""
    _, out, _ = quick_run
    report = json.loads(out.read_text())
    rows = chart.summary_rows(report["summary"])
    assert [r["label"] for r in rows] == ["im2col", "conv_transpose2d fwd", "conv_transpose2d fwd+bwd"]
    for row, e in zip(rows, report["summary"]):
        v = e["vs_torch"]
        assert row["speedups"]["torch"] == (v["median"], v["min"], v["max"])
        assert row["speedups"]["unfoldNd"] is None if "vs_unfoldNd" not in e else row["speedups"]["unfoldNd"]
        pct = e["rate"]["convt_ext"]["percent_of_ceiling"]
        assert row["ours"] == (pct["median"], pct["min"], pct["max"])
    cases = chart.case_rows(report["results"])
    assert len(cases) == len(report["results"]) == 3
    for row, r in zip(cases, report["results"]):
        assert r["shape"] in row["label"]
        assert row["speedups"]["torch"][0] == r["speedup"]["torch"]["median"]
        assert row["ours"][0] == r["rate"]["percent_of_ceiling"]


def test_the_readme_command_installs_matplotlib():
    bench_line = next(line for line in README.read_text().splitlines() if line.rstrip().endswith("python -P -m convt_ext.bench"))
    first_install = bench_line.split("&&")[0].split()
    assert first_install[:2] == ["pip", "install"] and "matplotlib" in first_install


def test_the_chart_is_optional(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    record = {"op": "im2col", "dims": 2, "direction": suite.FORWARD, "shape": SMALL,
              "speedup": {"torch": {"median": 2.0}}}
    assert chart.plot([record], [], tmp_path / "x.png", "title") is None
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "x-cases.png").exists()
    assert "matplotlib is not installed" in capsys.readouterr().out


def _canned_reference(device, quick, min_run_time, probe=False):
    gemm = [{"engine": "MKL", "call": "torch.mm", "m": 8, "k": 8, "n": 8, "gflops": 100.0}]
    return {"peak_gflops": 100.0, "peak_engine": "MKL", "peak_shape": [8, 8, 8], "gemm": gemm,
            "gemm_dtype": "float32", "copy_gbps": 10.0, "copy_bytes": 1}


def _canned_case(case, device, dtype, rounds, min_run_time, channels_last=False, autocast=None):
    impls = {k: {"label": k, "status": "ok", "note": None, "round_median_s": [0.01], "median_s": 0.01}
             for k in ("convt_ext", "torch")}
    return {"op": case.op, "dims": case.shape.dims, "direction": case.direction, "shape": case.shape.name,
            "batch": 1, "torch_backend": None, "status": "ok", "error": None, "impls": impls, "load_average": None,
            "flops": 1e9, "speedup": {"torch": {"median": 1.0, "rounds": [1.0]}}}


def test_a_run_without_matplotlib_succeeds_and_says_so(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(machine, "reference_rates", _canned_reference)
    monkeypatch.setattr(measure, "run_case", _canned_case)
    out = tmp_path / "x.json"
    assert cli.main(["--quick", "--ops", "conv2d", "--no-backward", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "matplotlib is not installed" in text
    assert text.rstrip().splitlines()[-1] == "chart: none (matplotlib is not installed)"
    assert out.exists() and not out.with_suffix(".png").exists()
    report = json.loads(out.read_text())
    assert report["results"][0]["rate"]["value"] == pytest.approx(100.0)  # 1 GFLOP in 10 ms
    assert report["results"][0]["rate"]["percent_of_ceiling"] == pytest.approx(100.0)


def _ref(gflops, copy, shape=(8, 8, 8)):
    m, k, n = shape
    gemm = [{"engine": e, "call": "x", "m": m, "k": k, "n": n, "gflops": v} for e, v in gflops.items()]
    best = max(gemm, key=lambda g: g["gflops"])
    return {"peak_gflops": best["gflops"], "peak_engine": best["engine"], "peak_shape": list(shape), "gemm": gemm,
            "copy_gbps": copy, "copy_bytes": 1}


def test_the_ceilings_are_the_best_of_every_measurement():
    """A busy moment at the start or the end does not set the ceilings: samples between cases count too."""
    start = _ref({"MKL": 80.0, "oneDNN": 70.0}, 9.0, (2048, 2048, 2048))
    end = _ref({"MKL": 90.0, "oneDNN": 60.0}, 8.0, (2048, 2048, 2048))
    probes = [_ref({"MKL": 150.0, "oneDNN": 170.0}, 17.0, (1024, 1024, 1024)), _ref({"MKL": 60.0}, 20.0, (1024, 1024, 1024))]
    ref = machine.combine_references(start, end, probes, {"cpu_capability": "AVX2", "cpu_flags": None})
    assert ref["peak_gflops"] == 170.0 and ref["peak_engine"] == "oneDNN" and ref["peak_shape"] == [1024, 1024, 1024]
    assert ref["peak_by_engine"] == {"MKL": 150.0, "oneDNN": 170.0}
    assert ref["copy_gbps"] == 20.0
    big = next(g for g in ref["gemm"] if g["engine"] == "MKL" and g["m"] == 2048)
    assert (big["gflops"], big["start"], big["end"], big["during"]) == (90.0, 80.0, 90.0, None)
    small = next(g for g in ref["gemm"] if g["engine"] == "MKL" and g["m"] == 1024)
    assert (small["gflops"], small["during"]) == (150.0, 150.0)
    assert ref["cpu_capability"] == "AVX2" and len(ref["probes"]) == 2


def test_a_run_samples_the_ceilings_between_cases(monkeypatch, tmp_path):
    monkeypatch.setattr(machine, "reference_rates", _canned_reference)
    monkeypatch.setattr(measure, "run_case", _canned_case)
    monkeypatch.setattr(machine, "PROBE_EVERY_S", 0.0)
    out = tmp_path / "x.json"
    assert cli.main(["--quick", "--ops", "conv2d", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    probes = report["reference"]["probes"]
    assert len(probes) == len(report["results"]) and [p["before_case"] for p in probes] == list(range(len(probes)))


def test_suite_covers_the_required_layers():
    names = [s.name for s in suite.SUITE]
    assert len(names) == len(set(names))
    assert all(s.description for s in suite.SUITE)

    def has(pred):
        return any(pred(s) for s in suite.SUITE)

    def conv(s, op, kernel, stride=None):
        return op in s.ops and s.kernels == kernel and (stride is None or s.strides == stride)

    # 2-d
    assert has(lambda s: conv(s, "conv2d", (3, 3), (1, 1))), "ResNet-like 3x3"
    assert has(lambda s: conv(s, "conv2d", (3, 3), (2, 2))), "strided 3x3"
    assert has(lambda s: conv(s, "conv2d", (7, 7), (2, 2)) and s.c_in == 3 and s.sizes == (224, 224)), "7x7 stem"
    assert has(lambda s: conv(s, "conv2d", (1, 1))), "1x1"
    assert has(lambda s: conv(s, "conv_transpose2d", (4, 4), (2, 2)) and s.paddings == (1, 1)), "4x4 s2 transposed"
    assert has(lambda s: conv(s, "conv_transpose2d", (2, 2), (2, 2))), "U-Net 2x2 up-conv"
    # 1-d (audio)
    for length in (16000, 4096):
        assert has(lambda s: conv(s, "conv1d", (3,)) and (s.c_in, s.c_out) == (64, 64) and s.sizes == (length,)), length
    assert has(lambda s: conv(s, "conv_transpose1d", (4,), (2,))), "1-d upsampler k4 s2"
    # 3-d (video, volumes)
    assert has(lambda s: conv(s, "conv3d", (3, 3, 3), (1, 1, 1)) and (s.c_in, s.c_out) == (32, 32)
               and s.sizes == (16, 32, 32)), "3x3x3 conv3d"
    assert has(lambda s: conv(s, "conv_transpose3d", (2, 2, 2), (2, 2, 2)) and (s.c_in, s.c_out) == (64, 32)
               and s.sizes == (8, 16, 16)), "3-d U-Net up-conv"
    assert has(lambda s: conv(s, "conv3d", (1, 3, 3))), "(1,3,3) kernel"
    for op in suite.OP_NAMES:
        assert has(lambda s: op in s.ops), op
        assert has(lambda s: op in s.ops and s.quick), f"--quick runs {op}"
    for op in suite.UNFOLD_OPS:
        for dims in suite.DIMS:
            assert has(lambda s: op in s.ops and s.dims == dims and s.quick), f"--quick runs {op} in {dims}-d"


def test_suite_covers_grouped_layers():
    """Depthwise layers (groups = channels) for every convolution op, 1-d to 3-d, direct and
    transposed; MobileNet's 3x3 at strides 1 and 2, ConvNeXt's 7x7, a channel multiplier of 2,
    ResNeXt's 32 groups of 4 channels; and a grouped layer in --quick."""
    def depthwise(s):
        return s.groups == s.c_in == s.c_out > 1

    grouped = [s for s in suite.SUITE if s.groups > 1]
    for op in suite.CONV_OPS:
        assert any(op in s.ops and depthwise(s) for s in grouped), op
    assert {s.strides for s in grouped if depthwise(s) and s.kernels == (3, 3)} >= {(1, 1), (2, 2)}
    assert any(depthwise(s) and s.kernels == (7, 7) and s.paddings == (3, 3) for s in grouped)
    assert any(s.groups == s.c_in and s.c_out == 2 * s.c_in for s in grouped), "channel multiplier 2"
    assert any(s.groups == 32 and s.c_in // s.groups == 4 for s in grouped), "ResNeXt 32x4d"
    assert any(s.quick for s in grouped)


@pytest.mark.parametrize("shape", suite.SUITE, ids=lambda s: s.name)
def test_suite_geometry_is_valid(shape):
    """torch accepts every case's tensors (on the meta device: no compute), with the sizes the
    rates are computed from."""
    n = shape.batch("cpu")
    c_big, big = shape.big
    assert len(big) == len(shape.windows) == shape.dims
    assert all(w >= 1 for w in shape.windows)
    for op in shape.ops:
        t = measure.make_inputs(op, shape, n, "meta", torch.float32, requires_grad=False)
        out = measure.OPS[op].impls["torch"].fn(shape, t)
        if op == "im2col":
            assert tuple(out.shape) == (n, c_big * math.prod(shape.kernels), math.prod(shape.windows))
        elif op == "col2im":
            assert tuple(out.shape) == (n, c_big, *big)
        else:
            assert op == shape.conv
            assert tuple(out.shape) == (n, shape.c_out, *(big if shape.transposed else shape.windows))
            assert shape.flops(n) > 0


TINY = suite.Shape("tiny-transposed", "a tiny 4x4 s2 p1 transposed layer", ("conv_transpose2d", "im2col"),
                   2, 4, 3, 5, 4, 2, 1, transposed=True)
# Small N-d layers with every kind of geometry (uneven kernels, strides, padding, dilation).
TINY_ND = [
    suite.Shape("tiny-1d", "1-d", ("conv1d", "im2col", "col2im"), 2, 3, 4, 11, 3, 2, 1, dilation=2, bias=True, dims=1),
    suite.Shape("tiny-1d-t", "1-d transposed", ("conv_transpose1d", "col2im"), 2, 4, 3, 6, 4, 2, 1, 1,
                transposed=True, dims=1),
    suite.Shape("tiny-3d", "3-d", ("conv3d", "im2col", "col2im"), 2, 3, 4, (5, 6, 7), (2, 3, 2), (1, 2, 2),
                (0, 1, 1), dilation=(1, 1, 2), dims=3),
    suite.Shape("tiny-3d-t", "3-d transposed", ("conv_transpose3d", "col2im"), 2, 4, 2, (3, 4, 2), (2, 3, 3),
                (2, 2, 1), (0, 1, 1), (1, 1, 0), bias=True, transposed=True, dims=3),
]


@pytest.mark.parametrize("shape", [s for s in TINY_ND if "im2col" in s.ops], ids=lambda s: s.name)
def test_torchs_nd_im2col_and_col2im_are_right(shape):
    """The references the N-d cases are checked against: torch's im2col equals a one-hot
    conv (and unfoldNd when installed), and its col2im is the adjoint, <U x, c> = <x, U^T c>."""
    torch.manual_seed(0)
    im = measure.make_inputs("im2col", shape, 2, "cpu", torch.float64, False)
    col = measure.make_inputs("col2im", shape, 2, "cpu", torch.float64, False)
    cols = measure.OPS["im2col"].impls["torch"].fn(shape, im)
    image = measure.OPS["col2im"].impls["torch"].fn(shape, col)
    conv = getattr(torch.nn.functional, f"conv{shape.dims}d")
    onehot = conv(im["x"], measure._onehot(shape, "cpu", torch.float64), None, shape.strides, shape.paddings,
                  shape.dilations, shape.big[0])
    torch.testing.assert_close(cols, onehot.reshape(cols.shape), rtol=0, atol=0)
    assert torch.dot(cols.flatten(), col["x"].flatten()).item() == pytest.approx(
        torch.dot(im["x"].flatten(), image.flatten()).item(), rel=1e-12)
    if measure.unfoldnd() is not None:
        for op, t, ref in (("im2col", im, cols), ("col2im", col, image)):
            torch.testing.assert_close(measure.OPS[op].impls["unfoldNd"].fn(shape, t), ref)


@pytest.mark.parametrize("direction", [suite.FORWARD, suite.BACKWARD])
@pytest.mark.parametrize("shape", TINY_ND, ids=lambda s: s.name)
def test_nd_cases_run_or_are_not_built(shape, direction):
    """On the build in use each N-d case either passes its check against torch and is
    timed, or, where the build lacks the op's N-d form, is "not built": never a failure."""
    for op in shape.ops:
        if direction == suite.BACKWARD and not suite.has_backward(op):
            continue
        record = measure.run_case(suite.Case(op, shape, direction), torch.device("cpu"), torch.float64, 1, 0.01)
        reason = measure.not_built(op, shape.dims)
        if reason is None:
            assert record["status"] == "ok", record["error"]
            assert record["impls"]["torch"]["status"] == "ok"
            if op in suite.CONV_OPS:  # n/a where the slow kernel takes no dilation (tiny-1d, tiny-3d)
                assert record["impls"]["torch_im2col"]["status"] in ("ok", "n/a")
            assert record["speedup"]["torch"]["median"] > 0
        else:
            assert record["status"] == measure.NOT_BUILT and record["error"] == reason
            assert "speedup" not in record


def test_the_2d_ops_are_built():
    for op in ("im2col", "col2im", "conv2d", "conv_transpose2d"):
        assert measure.not_built(op, 2) is None


def test_a_case_the_build_lacks_is_not_built_not_failed(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(measure, "not_built", lambda op, dims, device="cpu": f"no {op} here")
    record = measure.run_case(suite.Case("conv_transpose2d", TINY, suite.FORWARD), torch.device("cpu"), torch.float32, 1, 0.01)
    assert record["status"] == measure.NOT_BUILT and record["error"] == "no conv_transpose2d here"
    entry = bench_report.summarize([record])[0]
    assert entry["not_built"] == 1 and entry["failures"] == 0
    monkeypatch.setattr(machine, "reference_rates", _canned_reference)
    out = tmp_path / "x.json"
    assert cli.main(["--quick", "--dims", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["failures"] == 0 and report["not_built"]
    assert all(r["status"] == measure.NOT_BUILT for r in report["results"])
    assert "not built: conv1d: no conv1d here" in capsys.readouterr().out


def test_dims_selects_the_shapes():
    cases = suite.select_cases(suite.OP_NAMES, [], False, True, dims=(1, 3))
    assert cases and {c.shape.dims for c in cases} == {1, 3}
    assert {c.op for c in cases} == {"im2col", "col2im", "conv1d", "conv3d", "conv_transpose1d", "conv_transpose3d"}


def test_check_flags_a_mismatch():
    a = torch.randn(4, 5)
    assert measure.check((a,), (a.clone(),), torch.float32, ["output"]) is None
    problem = measure.check((a * 1.01,), (a,), torch.float32, ["output"])
    assert problem and problem.startswith("output:")


@pytest.mark.parametrize("direction", [suite.FORWARD, suite.BACKWARD])
def test_a_wrong_result_is_caught_and_not_timed(monkeypatch, direction):
    impls = measure.OPS["conv_transpose2d"].impls
    right = impls["convt_ext"].fn
    monkeypatch.setitem(impls, "convt_ext", measure.Impl("perturbed", lambda s, t: right(s, t) * 1.01))
    record = measure.run_case(suite.Case("conv_transpose2d", TINY, direction), torch.device("cpu"), torch.float32, 1, 0.01)
    assert record["status"] == "FAIL"
    assert record["impls"]["convt_ext"]["status"] == "FAIL"
    assert "grad_input" in record["error"] if direction == suite.BACKWARD else "output" in record["error"]
    assert "speedup" not in record and "median_s" not in record["impls"]["torch"]


def test_a_very_slow_comparator_is_timed_by_one_call(monkeypatch):
    monkeypatch.setattr(measure, "SLOW_CALL_S", 0.0)
    record = measure.run_case(suite.Case("conv_transpose2d", TINY, suite.FORWARD), torch.device("cpu"), torch.float32, 2, 0.01)
    assert record["status"] == "ok"
    assert "timed_once" not in record["impls"]["convt_ext"]  # ours is always timed in rounds
    assert len(record["impls"]["convt_ext"]["round_times_s"]) == 2
    torch_entry = record["impls"]["torch"]
    assert torch_entry["timed_once"] and torch_entry["median_s"] > 0
    assert record["speedup"]["torch"]["median"] > 0


def test_a_failure_makes_the_exit_code_nonzero(monkeypatch, tmp_path):
    impls = measure.OPS["im2col"].impls
    right = impls["convt_ext"].fn

    def shifted(s, t):
        out = right(s, t).clone()
        out.view(-1)[0] += 1.0
        return out

    monkeypatch.setitem(impls, "convt_ext", measure.Impl("perturbed", shifted))
    out = tmp_path / "x.json"
    code = cli.main(["--quick", "--ops", "im2col", "--dims", "2", "--shapes", SMALL, "--min-run-time", "0.01",
                       "--out", str(out)])
    assert code == 1
    report = json.loads(out.read_text())
    assert report["failures"] == 1 and report["results"][0]["status"] == "FAIL"


def test_an_empty_selection_is_an_error(tmp_path):
    assert cli.main(["--shapes", "no-such-shape", "--out", str(tmp_path / "x.json")]) == 2


def test_runs_as_a_module_outside_the_checkout(tmp_path):
    """`python -P -m convt_ext.bench` finds the package from sys.path, not the cwd."""
    env = dict(os.environ, PYTHONPATH=str(Path(convt_ext.__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-P", "-m", "convt_ext.bench", "--list"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert SMALL in proc.stdout and "video-3x3x3" in proc.stdout and "3-d" in proc.stdout


def test_a_case_torch_cannot_run_is_skipped_not_failed(monkeypatch):
    def unsupported(s, t):
        raise RuntimeError("not implemented for this dtype")

    monkeypatch.setitem(measure.OPS["conv_transpose2d"].impls, "torch", measure.Impl("F.conv_transpose2d", unsupported))
    record = measure.run_case(suite.Case("conv_transpose2d", TINY, suite.FORWARD), torch.device("cpu"), torch.float32, 1, 0.01)
    assert record["status"] == "skipped" and "not implemented" in record["error"]
    assert bench_report.summarize([record])[0]["failures"] == 0


@pytest.mark.parametrize("direction", ["forward", "forward+backward"])
def test_channels_last_cases_run_on_channels_last_tensors_and_check_strides(direction, monkeypatch):
    """--channels-last gives both sides channels_last inputs and weights, and the check
    compares the outputs' strides with torch's as well as their values."""
    t = measure.make_inputs("conv_transpose2d", TINY, 2, "cpu", torch.float32, False, channels_last=True)
    assert t["x"].is_contiguous(memory_format=torch.channels_last) and not t["x"].is_contiguous()
    assert t["w"].is_contiguous(memory_format=torch.channels_last) and not t["w"].is_contiguous()
    d = suite.FORWARD if direction == "forward" else suite.BACKWARD
    record = measure.run_case(suite.Case("conv_transpose2d", TINY, d), torch.device("cpu"), torch.float64, 1, 0.01,
                            channels_last=True)
    assert record["status"] == "ok", record
    # A planar result is a failure of the check, even with the right values.
    planar = torch.ones(2, 3, 4, 4)
    assert "memory format" in measure.check([planar], [planar.contiguous(memory_format=torch.channels_last)],
                                          torch.float32, ["output"])


@pytest.mark.parametrize("caller", ["default", "global_tf32_matmul_ieee"])
def test_tf32_is_set_for_both_sides_alike(caller):
    """--tf32: torch's convolutions and convt_ext's GEMMs read the same per-op flag, the
    report says what each used (the flags exist without a GPU too), and the caller's
    settings come back after. Also from the state in which torch's legacy allow_tf32
    getters throw: the global precision "tf32" with the matmul's "ieee"."""
    b = torch.backends
    state = lambda: (b.fp32_precision, b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision,  # noqa: E731
                     b.cuda.matmul.fp32_precision)
    if caller == "global_tf32_matmul_ieee":
        b.fp32_precision = "tf32"
        b.cuda.matmul.fp32_precision = "ieee"
    before = state()
    try:
        for on in (True, False):
            with machine.tf32(on) as used:
                assert used == {"torch_cudnn": on, "convt_ext": on, "matmul_ceiling": on}
                want = "tf32" if on else "ieee"
                assert b.cudnn.conv.fp32_precision == want and b.cuda.matmul.fp32_precision == want
            assert state() == before
    finally:
        b.fp32_precision = "none"
        reset_tf32()
    assert cli.parse_args(["--tf32", "on"]).tf32 == "on"
    assert cli.parse_args([]).tf32 == "off"
    assert cli.parse_args(["--gemm-engine", "onednn"]).gemm_engine == "onednn"


GLIBC = platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc's")
def test_the_run_records_the_allocator_state_it_fixed(quick_run):
    """Note [The allocator state]: the bench fixes glibc's mmap and trim thresholds before it
    times anything, says so first, and records them with the machine."""
    _, out, printed = quick_run
    state = json.loads(out.read_text())["machine"]["allocator"]
    assert state["fixed"] is True and state["allocator"].startswith("glibc ")
    assert (state["mmap_threshold"], state["trim_threshold"]) == (32 << 20, 64 << 20)
    assert printed.splitlines()[0] == machine.format_allocator(state)


# mallinfo2() in a fresh process: whether a 16 MiB block comes from mmap (hblkhd grows) or
# from the heap, before and after the bench's setting; and that importing convt_ext sets nothing.
ALLOCATOR_PROBE = """
import ctypes, sys
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split())]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def mapped():
    before = libc.mallinfo2().hblkhd
    p = libc.malloc(16 << 20)
    grown = libc.mallinfo2().hblkhd - before
    libc.free(p)
    return grown >= 16 << 20
import convt_ext
first = mapped()
from convt_ext.bench import machine
machine.set_allocator_state()
print(first, mapped(), "convt_ext.bench.machine" in sys.modules)
"""


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc's")
def test_the_allocator_state_is_the_bench_process_alone():
    """A fresh process that imports convt_ext keeps glibc's default (a 16 MiB block is
    mmapped); the bench's setting takes it from the heap."""
    done = subprocess.run([sys.executable, "-P", "-c", ALLOCATOR_PROBE], capture_output=True, text=True,
                          cwd=Path(convt_ext.__file__).parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "False", "True"]
    done = subprocess.run([sys.executable, "-P", "-c", "import sys, convt_ext; print('convt_ext.bench' in sys.modules)"],
                          capture_output=True, text=True, cwd=Path(convt_ext.__file__).parents[1])
    assert done.stdout.strip() == "False", done.stderr


def test_the_performance_goals_are_checked(quick_run):
    """Every goal of the device is reported: pass or miss by its threshold
    where the run covered it (recomputed here from the per-shape results),
    "not run" where it did not; and each is a row of the printed table."""
    code, out, stdout = quick_run
    report = json.loads(out.read_text())
    targets = report["targets"]
    assert len(targets) == len(bench_report.TARGETS["cpu"])
    covered = 0
    for t in targets:
        group = [r for r in report["results"] if r["op"] == t["op"] and r["dims"] == t["dims"]
                 and r["direction"] == t["direction"] and r["status"] == "ok"
                 and (r["layer"]["groups"] > 1) == (t["layers"] == bench_report.GROUPED)]
        if t["run"]:  # a goal of a channels_last or autocast run: not judged by a default one
            assert t["measured"] is None and t["status"] == "not run"
            continue
        if t["measure"] == "vs_torch" and group:
            values = [r["speedup"]["torch"]["median"] for r in group]
            expected = statistics.median(values) if t["statistic"] == "median" else min(values)
            assert t["measured"] == pytest.approx(expected)
            assert t["status"] == ("pass" if expected >= t["at_least"] else "miss")
            covered += 1
        elif not group:
            assert t["measured"] is None and t["status"] == "not run"
    assert covered >= 2  # im2col and conv_transpose2d forward ran
    met = sum(t["status"] == "pass" for t in targets)
    lines = stdout.splitlines()
    head = lines.index(next(line for line in lines if line.startswith("performance goals on the CPU: ")))
    assert lines[head].startswith(f"performance goals on the CPU: {met} of {len(targets)} met")
    spans = [m.span() for m in re.finditer(r"-+", lines[head + 2])]  # the rule under the column names
    table = lines[head + 3: head + 3 + len(targets)]
    for t, line in zip(targets, table):
        cells = [line[i:j].strip() for i, j in spans]
        measured = "-" if t["measured"] is None else (f"{t['measured']:.2f}x" if t["measure"].startswith("vs_")
                                                       else f"{t['measured']:.0f}%")
        assert cells == [t["status"], t["op"], t["direction"], bench_report.describe_target(t),
                         cells[4], measured], line
        assert float(cells[4].strip(">= x%")) == t["at_least"]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_goals_speak_of_the_product(device):
    """The goals read as the product's, for a user: no issue numbers, and every
    measure and statistic in words."""
    checked = bench_report.check_targets([], device)
    assert len(checked) == len(bench_report.TARGETS[device]) > 0
    assert all(t["status"] == "not run" for t in checked)
    text = bench_report.format_targets(checked, device)
    assert "issue" not in text.lower()
    assert text.splitlines()[0].startswith(f"performance goals on {'a GPU' if device == 'cuda' else 'the CPU'}: 0 of ")
    for t in checked:
        words = bench_report.describe_target(t)
        assert words in text and "_" not in words  # no code names (vs_torch, percent_out)


def test_no_issue_numbers_in_what_the_bench_prints_or_says(quick_run):
    _, _, stdout = quick_run
    assert "issue" not in stdout.lower()
    package = Path(cli.__file__).parent
    for path in [*package.glob("*.py"), README.parent / "benchmarks" / "README.md"]:
        assert "issue" not in path.read_text().lower(), path


def test_a_quick_run_from_the_command_line_writes_the_json_and_both_pngs(tmp_path):
    """`python -P -m convt_ext.bench --quick` (narrowed to one small case) end to end: the
    exit status, the JSON, the chart and its appendix, and the goals table."""
    out = tmp_path / "q.json"
    env = dict(os.environ, PYTHONPATH=str(Path(convt_ext.__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-P", "-m", "convt_ext.bench", "--quick", "--ops", "im2col", "--dims", "2",
                           "--shapes", SMALL, "--min-run-time", "0.01", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["settings"]["quick"] and [r["status"] for r in report["results"]] == ["ok"]
    for png in (out.with_suffix(".png"), tmp_path / "q-cases.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert "performance goals on the CPU: " in proc.stdout
    assert proc.stdout.rstrip().endswith(f"chart: {out.with_suffix('.png')} (every case: {tmp_path / 'q-cases.png'})")


def _summary_entry(op, dims, direction, vs_torch):
    return {"op": op, "dims": dims, "direction": direction, "vs_torch": {"median": vs_torch, "min": vs_torch}}


def test_goals_are_judged_by_the_kind_of_run_they_are_for():
    """A channels_last goal counts in a --channels-last run only, a bf16 goal in an
    --autocast bf16 run only (and is reported, not judged, where oneDNN's ukernel has no
    bf16 pack: cpublas::could_pack, AMX alone),
    and the FMA goal takes the 3x3 layers of >= 64 channels, over the FMA peak."""
    summary = [_summary_entry("conv2d", 2, suite.FORWARD, 1.3), _summary_entry("conv_transpose2d", 2, suite.FORWARD, 0.5)]
    layer = lambda k, c: {"kernels": [k, k], "c_in": c, "c_out": c, "groups": 1}  # noqa: E731
    results = [
        {"op": "conv2d", "dims": 2, "direction": suite.FORWARD, "layer": layer(3, 64),
         "rate": {"impls": {"convt_ext": {"value": 90.0}}}},
        {"op": "conv2d", "dims": 2, "direction": suite.FORWARD, "layer": layer(3, 256),
         "rate": {"impls": {"convt_ext": {"value": 70.0}}}},
        {"op": "conv2d", "dims": 2, "direction": suite.FORWARD, "layer": layer(1, 256),  # not 3x3: left out
         "rate": {"impls": {"convt_ext": {"value": 10.0}}}},
        {"op": "conv2d", "dims": 2, "direction": suite.FORWARD, "layer": layer(3, 32),  # too few channels
         "rate": {"impls": {"convt_ext": {"value": 10.0}}}},
    ]
    reference = {"fma_peak_gflops": 100.0}

    def judged(settings, packs=True):
        return {(t["op"], t["measure"], t["statistic"], tuple(sorted(t["run"]))): t
                for t in bench_report.check_targets(summary, "cpu", results, reference, settings, packs)
                if t["direction"] == suite.FORWARD and t["dims"] == 2 and t["layers"] == bench_report.DENSE}

    default = judged({"channels_last": False, "autocast": None})
    assert default[("conv2d", "vs_torch", "median", ())]["measured"] == 1.3
    assert default[("conv2d", "vs_torch", "median", ())]["status"] == "pass"  # 1.3 >= 1.2
    assert default[("conv_transpose2d", "vs_torch", "median", ())]["status"] == "miss"
    assert all(t["status"] == "not run" for k, t in default.items() if k[3])

    cl = judged({"channels_last": True, "autocast": None})
    fma = cl[("conv2d", "percent_fma_3x3", "median", ("channels_last",))]
    assert fma["measured"] == pytest.approx(80.0) and fma["status"] == "miss"  # median of 90% and 70%
    assert cl[("conv2d", "vs_torch", "median", ("channels_last",))]["status"] == "pass"
    assert all(t["status"] == "not run" for k, t in cl.items() if not k[3])

    bf16 = judged({"channels_last": False, "autocast": "bf16"}, packs=False)
    assert bf16[("conv2d", "vs_torch", "median", ("autocast",))]["status"] == "report"
    bf16 = judged({"channels_last": False, "autocast": "bf16"}, packs=True)
    assert bf16[("conv_transpose2d", "vs_torch", "median", ("autocast",))]["status"] == "miss"


def test_grouped_layers_have_their_own_summary_and_goals():
    """Layers with groups > 1 are summarized apart ("conv2d grouped") and judged by their own
    goals; the dense goals count the dense layers alone, also the FMA share."""
    def record(groups, speedup, kernel=3):
        return {"op": "conv2d", "dims": 2, "direction": suite.FORWARD, "status": "ok",
                "layer": {"kernels": [kernel, kernel], "c_in": 128, "c_out": 128, "groups": groups},
                "impls": {}, "speedup": {"torch": {"median": speedup}},
                "rate": {"impls": {"convt_ext": {"value": 90.0 if groups == 1 else 1.0, "percent_of_ceiling": 50.0}}}}

    results = [record(1, 1.5), record(1, 1.3), record(128, 0.2), record(32, 1.1)]
    summary = bench_report.summarize(results)
    assert [(e["label"], e["grouped"], e["shapes"]) for e in summary] == [
        ("conv2d", False, 2), ("conv2d grouped", True, 2)]
    checked = bench_report.check_targets(summary, "cpu", results, {"fma_peak_gflops": 100.0}, {"channels_last": False})
    judged = {(t["layers"], t["statistic"]): t for t in checked
              if (t["op"], t["direction"], t["measure"], t["run"]) == ("conv2d", suite.FORWARD, "vs_torch", {})}
    assert judged[("dense", "median")]["measured"] == pytest.approx(1.4)
    assert judged[("dense", "min")]["measured"] == 1.3
    assert judged[("grouped", "median")]["measured"] == pytest.approx(0.65)
    assert judged[("grouped", "min")]["measured"] == 0.2 and judged[("grouped", "min")]["status"] == "miss"
    assert "on grouped layers (groups > 1)" in bench_report.describe_target(judged[("grouped", "min")])
    assert "grouped" not in bench_report.describe_target(judged[("dense", "min")])
    grouped_ops = {(t["op"], t["direction"]) for t in checked if t["layers"] == bench_report.GROUPED}
    assert grouped_ops == {(op, d) for op in suite.CONV_OPS for d in (suite.FORWARD, suite.BACKWARD)}
    cl = bench_report.check_targets(summary, "cpu", results, {"fma_peak_gflops": 100.0}, {"channels_last": True})
    fma = next(t for t in cl if t["measure"] == "percent_fma_3x3")
    assert fma["measured"] == pytest.approx(90.0)  # the grouped layers' 1% left out


def test_the_dcgan_step(tmp_path):
    """--model dcgan: both sides train from the same weights; the first step's
    losses agree; the JSON has the step times and the speedup."""
    out = tmp_path / "dcgan.json"
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        code = cli.main(["--model", "dcgan", "--quick", "--out", str(out)])
    assert code == 0, stdout.getvalue()
    report = json.loads(out.read_text())
    assert report["agree"] and report["model"] == "dcgan" and report["batch"] == 64
    assert report["speedup"] > 0 and len(report["round_s"]["torch"]) == len(report["round_s"]["convt_ext"]) == 1
    a, b = report["first_losses"]["torch"], report["first_losses"]["convt_ext"]
    assert all(abs(x - y) <= 1e-3 * max(1.0, abs(x)) for x, y in zip(a, b))
    assert "speedup" in stdout.getvalue() and "goal: at least 1.0x" in stdout.getvalue()


def test_the_fma_peak_is_measured():
    p = convt_ext._C.fma_peak(0.05)
    if not p["isa"]:
        pytest.skip("no FMA loop for this CPU (not x86 with AVX2)")
    assert p["isa"] in ("avx2+fma", "avx512f") and p["gflops"] > 1.0 and p["threads"] == torch.get_num_threads()


def test_mobilenetv2_is_the_papers_model():
    """The hand-written model has MobileNetV2's 3,504,872 parameters (torchvision's count
    at 1000 classes), 52 convolutions of which 17 depthwise, and a 5x5 map before the
    pool at 160x160."""
    model = mobilenetv2.mobilenetv2(torch.nn.Conv2d)
    assert sum(p.numel() for p in model.parameters()) == 3_504_872
    found = layers.conv_layers(model.eval(), torch.zeros(1, 3, mobilenetv2.SIZE, mobilenetv2.SIZE))
    assert len(found) == 52 and sum(m.groups == m.in_channels > 1 for _, m, _ in found) == 17
    assert found[-1][0] == "last.conv" and found[-1][2] == (1, 320, 5, 5)
    assert sum(isinstance(m, mobilenetv2.InvertedResidual) and m.residual for m in model.modules()) == 10


def test_resnet18_is_the_papers_model():
    """The hand-written model has ResNet-18's 11,689,512 parameters (torchvision's count at
    1000 classes), 20 convolutions of which 3 are 1x1 stride-2 downsamples, and a 5x5 map
    before the pool at 160x160."""
    model = resnet18.resnet18(torch.nn.Conv2d)
    assert sum(p.numel() for p in model.parameters()) == 11_689_512
    found = layers.conv_layers(model.eval(), torch.zeros(1, 3, resnet18.SIZE, resnet18.SIZE))
    assert len(found) == 20 and found[0][0] == "stem.conv" and found[0][1].kernel_size == (7, 7)
    assert [name for name, m, _ in found if m.kernel_size == (1, 1)] == [
        f"layer{i}.0.downsample.conv" for i in (2, 3, 4)]
    assert found[-1][0] == "layer4.1.conv2.conv" and found[-1][2] == (1, 512, 5, 5)


def test_a_models_layers_become_suite_shapes():
    """conv_layers lists every convolution with the input it gets; layer_shape turns one into
    the suite's Shape, whose case computes what the module does; time_layers times each
    geometry once and counts how often it occurs."""
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
        torch.nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), torch.nn.ConvTranspose2d(8, 4, 4, 2, 1, groups=4))
    x = torch.randn(2, 3, 12, 10)
    found = layers.conv_layers(model, x)
    assert [(name, shape) for name, _, shape in found] == [
        ("0", (2, 3, 12, 10)), ("1", (2, 8, 6, 5)), ("2", (2, 8, 6, 5)), ("3", (2, 8, 6, 5))]
    for name, module, shape in found:
        s = layers.layer_shape(name, module, shape)
        t = {"x": torch.randn(shape), "w": module.weight.detach(), "b": module.bias}
        with torch.no_grad():
            torch.testing.assert_close(measure.OPS[s.conv].impls["torch"].fn(s, t), module(t["x"]))
    rows = layers.time_layers(found, torch.device("cpu"), 1, 0.01, formats=("nchw",))
    assert [(r["names"], r["count"]) for r in rows] == [(["0"], 1), (["1", "2"], 2), (["3"], 1)]
    for r in rows:
        assert set(r["cases"]["nchw"]) == {suite.FORWARD, suite.BACKWARD}
        assert all(rec["status"] == "ok" and set(rec["impls"]) == {"convt_ext", "torch"}
                   for rec in r["cases"]["nchw"].values())
    # Time-weighted totals: each geometry's times as often as it occurs.
    total = layers.totals(rows)["nchw"][suite.FORWARD]
    ours = sum(r["count"] * r["cases"]["nchw"][suite.FORWARD]["impls"]["convt_ext"]["median_s"] for r in rows)
    assert total["convt_ext_s"] == pytest.approx(ours)
    assert total["speedup"] == pytest.approx(total["torch_s"] / ours)
    assert layers.totals(rows, layers.grouped)["nchw"][suite.FORWARD]["convt_ext_s"] < ours
    table = layers.format_table(rows)
    assert "all 4 conv layers, time-weighted" in table and "grouped 3 conv layers, time-weighted" in table


def _run_classifier_mode(name, tmp_path):
    """--model `name` --quick (the caller shrinks the model): both formats, both modes, the
    first call's logits and loss agree, the model's goals, every conv layer checked and timed
    in both formats and directions, and the JSON with the machine, its allocator state and
    the path. Returns the JSON and what was printed."""
    out = tmp_path / f"{name}.json"
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        code = cli.main(["--model", name, "--quick", "--min-run-time", "0.01", "--out", str(out)])
    printed = stdout.getvalue()
    assert code == 0, printed
    report = json.loads(out.read_text())
    assert report["model"] == name and report["agree"] and report["batch"] == 2
    assert set(report["formats"]) == {"nchw", "channels_last"}
    for fmt, r in report["formats"].items():
        assert r["agree"] and r["problem"] is None and r["grad_rel_diff"] < 0.05
        for mode in mobilenetv2.MODES:
            assert len(r[mode]["round_s"]["torch"]) == len(r[mode]["round_s"]["convt_ext"]) == 1
            assert r[mode]["speedup"] > 0 and r[mode]["status"] == ("pass" if r[mode]["speedup"] >= 1.0 else "miss")
    assert [(t["format"], t["mode"]) for t in report["targets"] if "mode" in t] == [
        (f, m) for f in ("nchw", "channels_last") for m in ("inference", "training")]
    for r in report["layers"]["rows"]:
        for fmt in ("nchw", "channels_last"):
            assert {d: rec["status"] for d, rec in r["cases"][fmt].items()} == {
                suite.FORWARD: "ok", suite.BACKWARD: "ok"}, (r["names"], fmt)
    assert report["layers"]["totals"]["channels_last"][suite.BACKWARD]["speedup"] > 0
    assert report["machine"]["allocator"] == machine.allocator_state()
    assert report["conv_path"]["calls"]["view"] + report["conv_path"]["calls"]["columns"] > 0
    assert printed.splitlines()[0] == machine.format_allocator(machine.allocator_state())
    assert "cl fwd+bwd" in printed and ">= 1.00x" in printed
    return report, printed


def test_the_mobilenetv2_mode(monkeypatch, tmp_path):
    """--model mobilenetv2 (two blocks at 32x32, batch 2, to stay fast): the classifier
    mode's checks, 10 conv layers of which 3 geometries grouped, and no layer goals."""
    monkeypatch.setattr(mobilenetv2, "BLOCKS", ((1, 16, 1, 1), (6, 24, 2, 2)))
    monkeypatch.setattr(mobilenetv2, "SIZE", 32)
    report, printed = _run_classifier_mode("mobilenetv2", tmp_path)
    assert report["batch"] == mobilenetv2.QUICK_BATCH and len(report["targets"]) == 4
    rows = report["layers"]["rows"]
    assert sum(r["count"] for r in rows) == 10 and sum(r["layer"]["groups"] > 1 for r in rows) == 3
    assert "block2.depthwise.conv" in printed


def test_the_resnet18_mode(monkeypatch, tmp_path):
    """--model resnet18 (two stages of 16 and 32 channels at 32x32, batch 2, to stay fast):
    the classifier mode's checks, 10 conv layers in 5 geometries, and each geometry's forward
    in each format against its goal, at least min(1.0x torch, 88% of the FMA peak)."""
    monkeypatch.setattr(resnet18, "STEM", 16)
    monkeypatch.setattr(resnet18, "STAGES", ((16, 1), (32, 2)))
    monkeypatch.setattr(resnet18, "SIZE", 32)
    report, printed = _run_classifier_mode("resnet18", tmp_path)
    assert report["batch"] == resnet18.QUICK_BATCH and report["stages"] == [[16, 1], [32, 2]]
    rows = report["layers"]["rows"]
    assert [(r["names"][0], r["count"]) for r in rows] == [
        ("stem.conv", 1), ("layer1.0.conv1.conv", 4), ("layer2.0.conv1.conv", 1), ("layer2.0.conv2.conv", 3),
        ("layer2.0.downsample.conv", 1)]
    goals = [t for t in report["targets"] if "layer" in t]
    assert [(t["layer"], t["format"]) for t in goals] == [
        (r["names"][0], f) for r in rows for f in ("nchw", "channels_last")]
    fma = report["layers"].get("fma_peak_gflops")
    for t in goals:
        assert t["direction"] == suite.FORWARD and t["at_least"] == 1.0 and t["measured"] > 0
        assert t["or_percent_fma"] == (88.0 if fma else None) and (t["percent_fma"] is None) == (fma is None)
        met = t["measured"] >= 1.0 or (fma is not None and t["percent_fma"] >= 88.0)
        assert t["status"] == ("pass" if met else "miss")
    assert "per-layer goals, forward:" in printed and "layer2.0.downsample.conv" in printed


def test_the_bf16_goals_follow_the_ukernels_bf16_pack():
    """The bench judges its bf16 goals where cpublas::could_pack(bf16) is true (AMX)
    and reports them elsewhere: engine_info says which, from the CPU's own flags. An
    AMX-BF16 CPU packs; a CPU with neither AMX nor AVX512-BF16 cannot."""
    info = convt_ext.engine_info()
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    assert isinstance(info["cpu_packs_bf16"], bool)
    if "amx_bf16" in flags and os.environ.get("ONEDNN_MAX_CPU_ISA") is None:
        assert info["cpu_packs_bf16"]
    if flags and "amx_bf16" not in flags:
        assert not info["cpu_packs_bf16"]
    if info["cpu_packs_bf16"]:
        assert info["cpu_native_bf16"]
