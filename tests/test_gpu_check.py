"""Tests of the GPU check's benchmark step (python -m convt_ext.bench.gpu) on the CPU: the case
order, the TF32 tolerance, a smoke run end to end (JSON and charts), the time budget; and that
the GPU check script parses its arguments. CI runs the whole script with --dry-run."""
import ast
import contextlib
import io
import json
import subprocess
from pathlib import Path

import pytest
import torch

from convt_ext.bench import gpu, machine, measure
from convt_ext.bench.suite import BACKWARD, CONV_OPS, FORWARD

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
TESTS = Path(__file__).resolve().parent


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("smoke", [False, True])
def test_every_op_comes_early_and_every_case_once(smoke):
    cases = gpu.ordered_cases(smoke)
    assert len({c.label for c in cases}) == len(cases)
    # The first round of the round robin holds each op once, so a short budget still covers them all.
    assert [c.op for c in cases[: len(gpu.OPS)]] == list(gpu.OPS)
    for op in gpu.OPS:
        directions = {c.direction for c in cases if c.op == op}
        assert directions == ({FORWARD, BACKWARD} if op in CONV_OPS else {FORWARD})
    assert all(c.shape.dims == 2 for c in cases)
    if not smoke:
        assert len(cases) > 30
        # Within an op, the --quick shapes come first.
        for op in gpu.OPS:
            quick = [c.shape.quick for c in cases if c.op == op]
            assert quick == sorted(quick, reverse=True)


def test_tf32_loosens_only_float32_and_only_while_on():
    before = dict(measure.TOLERANCES)
    with gpu.tf32(torch.device("cpu"), True):
        assert measure.TOLERANCES[torch.float32] == gpu.TF32_TOLERANCE
        assert measure.TOLERANCES[torch.float64] == before[torch.float64]
    assert measure.TOLERANCES == before
    with gpu.tf32(torch.device("cpu"), False):
        assert measure.TOLERANCES == before
    with pytest.raises(RuntimeError), gpu.tf32(torch.device("cpu"), True):
        raise RuntimeError
    assert measure.TOLERANCES == before


def test_the_tf32_tolerance_still_catches_a_wrong_result():
    want = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    wrong = want.clone()
    wrong[0, 0, 3, 3] += 0.1 * want.abs().max()
    with gpu.tf32(torch.device("cpu"), True):
        assert measure.check([wrong], [want], torch.float32, ["output"]) is not None
        assert measure.check([want * (1 + 1e-3)], [want], torch.float32, ["output"]) is None


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_bench")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = gpu.main(["--out", str(out), "--device", "cpu", "--smoke", "--budget", "600", "--min-run-time", "0.01"])
    return code, out, stdout.getvalue()


def test_a_smoke_run_times_every_case_under_both_settings(smoke_run):
    code, out, printed = smoke_run
    assert code == 0, printed
    data = json.loads((out / "bench.json").read_text())
    assert data["left_out"] == [] and data["settings"]["device"] == "cpu"
    cases = gpu.ordered_cases(True)
    off, on = data["tf32"]["off"], data["tf32"]["on"]
    # Every case under TF32 off; the convolutions again under TF32 on; each checked and timed.
    assert [(r["op"], r["direction"], r["shape"]) for r in off["results"]] == [
        (c.op, c.direction, c.shape.name) for c in cases]
    assert [(r["op"], r["direction"]) for r in on["results"]] == [(c.op, c.direction) for c in cases if c.op in CONV_OPS]
    for r in off["results"] + on["results"]:
        assert r["status"] == "ok", r
        assert r["batch"] >= 1
        assert r["impls"]["convt_ext"]["median_s"] > 0 and r["impls"]["torch"]["median_s"] > 0
        assert r["rate"]["value"] > 0
    for p in (off, on):
        assert p["reference"]["peak_gflops"] > 0 and p["reference"]["copy_gbps"] > 0
        assert {e["op"] for e in p["summary"]} == ({*gpu.OPS} if p is off else set(CONV_OPS) & {*gpu.OPS})
    assert data["transfers"] is None  # host <-> GPU copies: CUDA only
    assert "bench: 11 runs of 7 cases, 0 failed, 0 cases left out" in printed


@pytest.mark.skipif(not _has_matplotlib(), reason="needs matplotlib")
def test_a_smoke_run_draws_a_chart_per_setting(smoke_run):
    _, out, _ = smoke_run
    for setting in gpu.SETTINGS:
        for name in (f"bench-tf32-{setting}.png", f"bench-tf32-{setting}-cases.png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_budget_leaves_cases_out_and_says_so(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu, "SMOKE", gpu.SMOKE[:1])
    reference = machine.reference_rates(torch.device("cpu"), True, 0.01)
    monkeypatch.setattr(machine, "reference_rates", lambda *a, **k: reference)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = gpu.main(["--out", str(tmp_path), "--device", "cpu", "--smoke", "--budget", "1e-9"])
    data = json.loads((tmp_path / "bench.json").read_text())
    assert code == 0
    # The budget is checked before each case: the first one runs, the rest are listed.
    assert len(data["tf32"]["off"]["results"]) == 1
    assert len(data["left_out"]) == len(gpu.ordered_cases(True)) - 1 > 0
    assert f"{len(data['left_out'])} cases left out" in stdout.getvalue()


@pytest.mark.parametrize("argv", [[], ["--bogus", "x"], ["a", "b"]])
def test_the_script_rejects_bad_arguments(argv, tmp_path):
    done = subprocess.run(["bash", str(SCRIPT), *argv], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert done.returncode == 2
    assert "usage:" in done.stderr


def _names(nodes):
    """The dotted names in decorators or a pytestmark value: "requires_cuda", "pytest.mark.cuda"."""
    for node in nodes:
        for sub in ast.walk(node):
            if isinstance(sub, (ast.Name, ast.Attribute)):
                yield ast.unparse(sub)


def test_every_test_that_needs_a_gpu_is_selected_by_the_cuda_marker():
    """The GPU check runs `pytest -m cuda`: a test skipped without a GPU but not marked `cuda`
    would never run on the GPU."""
    checked, unmarked = 0, []
    for path in sorted(TESTS.glob("test_*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        module_marks = [n.value for n in tree.body if isinstance(n, ast.Assign)
                        and any(getattr(t, "id", None) == "pytestmark" for t in n.targets)]
        module_cuda = "pytest.mark.cuda" in set(_names(module_marks))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
                names = set(_names(node.decorator_list))
                if "requires_cuda" in names or (module_cuda and "requires_cuda" in set(_names(module_marks))):
                    checked += 1
                    if not (module_cuda or "pytest.mark.cuda" in names):
                        unmarked.append(f"{path.name}::{node.name}")
    assert checked >= 10  # the scan finds the CUDA tests
    assert unmarked == []
