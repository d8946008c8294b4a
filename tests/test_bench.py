"""Tests of the benchmark tool (python -m convt_ext.bench): a quick run end to
end, the suite's coverage, and that a wrong result is caught, not timed."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import convt_ext
from convt_ext import bench

SMALL = "dcgan-64to3-32"  # a --quick shape with both im2col and conv_transpose2d
QUICK = ["--quick", "--ops", "im2col,conv_transpose2d", "--shapes", SMALL, "--min-run-time", "0.02"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "x.json"
    code = bench.main(QUICK + ["--out", str(out)])
    return code, out


def test_quick_run_writes_a_complete_report(quick_run):
    code, out = quick_run
    assert code == 0
    report = json.loads(out.read_text())
    machine = report["machine"]
    for key in ("cpu", "torch", "torch_threads", "convt_ext", "date", "mkldnn"):
        assert machine[key] is not None, key
    assert machine["convt_ext"]["version"] == convt_ext.__version__
    assert report["reference"]["gemm_gflops"] > 0
    assert report["reference"]["copy_gbps"] > 0
    results = report["results"]
    measured = {(r["op"], r["direction"]) for r in results}
    assert measured == {("im2col", "forward"), ("conv_transpose2d", "forward"), ("conv_transpose2d", "forward+backward")}
    assert report["failures"] == 0
    for r in results:
        assert r["shape"] == SMALL
        assert r["status"] == "ok"
        assert r["impls"]["convt_ext"]["status"] == "ok"
        assert r["speedup"]["torch"]["median"] > 0
        assert all(t > 0 for t in r["impls"]["convt_ext"]["round_median_s"])
        assert r["rate"]["value"] > 0
        if r["op"] == "conv_transpose2d":  # groups=1: torch's slow_conv_transpose2d applies
            assert r["impls"]["torch_im2col"]["status"] in ("ok", "n/a")
    assert {(s["op"], s["direction"]) for s in report["summary"]} == measured


def test_quick_run_writes_a_chart_if_matplotlib_is_installed(quick_run):
    code, out = quick_run
    png = out.with_suffix(".png")
    try:
        import matplotlib  # noqa: F401  (an optional extra: CI runs without it)
    except ImportError:
        assert code == 0 and not png.exists()
    else:
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_chart_is_optional(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    record = {"op": "im2col", "direction": bench.FORWARD, "shape": SMALL,
              "speedup": {"torch": {"median": 2.0}}}
    assert bench.plot([record], tmp_path / "x.png", "title") is None
    assert not (tmp_path / "x.png").exists()
    assert "matplotlib is not installed" in capsys.readouterr().out


def test_suite_covers_the_required_layers():
    suite = bench.SUITE
    names = [s.name for s in suite]
    assert len(names) == len(set(names))
    assert all(s.description for s in suite)

    def has(pred):
        return any(pred(s) for s in suite)

    assert has(lambda s: "conv2d" in s.ops and s.kernel == 3 and s.stride == 1), "ResNet-like 3x3"
    assert has(lambda s: "conv2d" in s.ops and s.kernel == 3 and s.stride == 2), "strided 3x3"
    assert has(lambda s: "conv2d" in s.ops and s.kernel == 7 and s.stride == 2 and s.c_in == 3 and s.size == 224), "7x7 stem"
    assert has(lambda s: "conv2d" in s.ops and s.kernel == 1), "1x1"
    assert has(lambda s: "conv_transpose2d" in s.ops and s.kernel == 4 and s.stride == 2 and s.padding == 1), "4x4 s2 transposed"
    assert has(lambda s: "conv_transpose2d" in s.ops and s.kernel == 2 and s.stride == 2), "U-Net 2x2 up-conv"
    for op in bench.OP_NAMES:
        assert has(lambda s: op in s.ops), op
        assert has(lambda s: op in s.ops and s.quick), f"--quick runs {op}"


@pytest.mark.parametrize("shape", bench.SUITE, ids=lambda s: s.name)
def test_suite_geometry_is_valid(shape):
    """torch accepts every case's tensors (on the meta device: no compute)."""
    for op in shape.ops:
        t = bench.make_inputs(op, shape, shape.batch("cpu"), "meta", torch.float32, requires_grad=False)
        out = bench.OPS[op].impls["torch"].fn(shape, t)
        if op in ("conv2d", "conv_transpose2d"):
            assert tuple(out.shape[1:]) == (shape.c_out, *(2 * [shape.windows if not shape.transposed else shape.big[1]]))


def test_check_flags_a_mismatch():
    a = torch.randn(4, 5)
    assert bench.check((a,), (a.clone(),), torch.float32, ["output"]) is None
    problem = bench.check((a * 1.01,), (a,), torch.float32, ["output"])
    assert problem and problem.startswith("output:")


TINY = bench.Shape("tiny-transposed", "a tiny 4x4 s2 p1 transposed layer", ("conv_transpose2d", "im2col"),
                   2, 4, 3, 5, 4, 2, 1, transposed=True)


@pytest.mark.parametrize("direction", [bench.FORWARD, bench.BACKWARD])
def test_a_wrong_result_is_caught_and_not_timed(monkeypatch, direction):
    impls = bench.OPS["conv_transpose2d"].impls
    right = impls["convt_ext"].fn
    monkeypatch.setitem(impls, "convt_ext", bench.Impl("perturbed", lambda s, t: right(s, t) * 1.01))
    record = bench.run_case(bench.Case("conv_transpose2d", TINY, direction), torch.device("cpu"), torch.float32, 1, 0.01)
    assert record["status"] == "FAIL"
    assert record["impls"]["convt_ext"]["status"] == "FAIL"
    assert "grad_input" in record["error"] if direction == bench.BACKWARD else "output" in record["error"]
    assert "speedup" not in record and "median_s" not in record["impls"]["torch"]


def test_a_failure_makes_the_exit_code_nonzero(monkeypatch, tmp_path):
    impls = bench.OPS["im2col"].impls
    right = impls["convt_ext"].fn

    def shifted(s, t):
        out = right(s, t).clone()
        out.view(-1)[0] += 1.0
        return out

    monkeypatch.setitem(impls, "convt_ext", bench.Impl("perturbed", shifted))
    out = tmp_path / "x.json"
    code = bench.main(["--quick", "--ops", "im2col", "--shapes", SMALL, "--min-run-time", "0.01", "--out", str(out)])
    assert code == 1
    report = json.loads(out.read_text())
    assert report["failures"] == 1 and report["results"][0]["status"] == "FAIL"


def test_an_empty_selection_is_an_error(tmp_path):
    assert bench.main(["--shapes", "no-such-shape", "--out", str(tmp_path / "x.json")]) == 2


def test_runs_as_a_module_outside_the_checkout(tmp_path):
    """`python -P -m convt_ext.bench` finds the package from sys.path, not the cwd."""
    env = dict(os.environ, PYTHONPATH=str(Path(convt_ext.__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-P", "-m", "convt_ext.bench", "--list"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert SMALL in proc.stdout


def test_a_case_torch_cannot_run_is_skipped_not_failed(monkeypatch):
    def unsupported(s, t):
        raise RuntimeError("not implemented for this dtype")

    monkeypatch.setitem(bench.OPS["conv_transpose2d"].impls, "torch", bench.Impl("F.conv_transpose2d", unsupported))
    record = bench.run_case(bench.Case("conv_transpose2d", TINY, bench.FORWARD), torch.device("cpu"), torch.float32, 1, 0.01)
    assert record["status"] == "skipped" and "not implemented" in record["error"]
    assert bench.summarize([record])[0]["failures"] == 0
