"""A hypothesis fuzz of every op (im2col, col2im, conv1d/2d/3d,
conv_transpose1d/2d/3d, conv1d/2d/3d_weight and the nn modules) over valid and
invalid argument combinations, values at the int32 / int64 limits included.

The hypothesis loops run in a child process (tests/fuzz_worker.py, mode
`fuzz`), derandomized and without a database, so the run is the same every
time and a crash fails the target it happened in (with the last case drawn),
not the test session. The oracle, per example (see `judge` in the worker):

  * small values: torch decides. torch raises -> we raise ValueError/TypeError;
    torch returns -> we return the same (float64, tight tolerance);
  * a value at the limits: torch is not asked (it wraps too: F.unfold with
    kernel_size 2**40 returns a tensor of negative size, F.conv2d with
    dilation 2**62 returns a wrong shape); exact integer arithmetic decides:
    invalid or beyond int64 -> ValueError naming one of the arguments at fault;
    valid -> the exact result (the worker's exact-integer reference), or a
    ValueError naming the extreme argument;
  * meaningless geometry that torch accepts anyway -> we must raise ValueError.
    torch does so only with an EMPTY INPUT (batch or channels), where it skips its geometry
    checks: conv_transpose with output_padding >= max(stride, dilation), or
    dilation 0, or an output size of 0; conv weight gradients whose
    grad_output has more windows than the input. A shape rule must not depend
    on the batch size, so we must refuse these (test_fuzz_meaningless_cases
    checks that torch accepts them only with an empty batch);
  * the one extension: a weight gradient whose grad_output is short of the
    input's windows (needed by conv_transpose's weight gradient when
    output_padding >= stride): torch refuses it, we may compute it, checked
    against the exact reference;
  * never an exception other than ValueError/TypeError, never a change to the
    caller's tensors.

The exact-integer references are cross-checked against F.unfold / F.fold /
F.convNd on every small 2-d example (a disagreement fails as HARNESS)."""
import json
import os
import subprocess
import sys

import pytest

from test_reliability import ND_SKIP, WORKER, _text, worker_env

TARGETS = [
    "im2col",
    "col2im",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "conv1d_weight",
    "conv2d_weight",
    "conv3d_weight",
    "nn",
]
ND_TARGETS = {"conv1d", "conv3d", "conv_transpose1d", "conv_transpose3d", "conv1d_weight", "conv3d_weight"}
MAX_EXAMPLES = int(os.environ.get("CONVT_EXT_FUZZ_EXAMPLES", "120"))


def run_fuzz(targets, tmp_dir, timeout=480):
    """{target: summary}; a target whose worker died gets {"crashed": rc,
    "last_case": ...} and the worker restarts with the targets after it."""
    results = {}
    todo = list(targets)
    while todo:
        cmd = [sys.executable, "-P", WORKER, "fuzz", ",".join(todo), str(MAX_EXAMPLES)]
        try:
            proc = subprocess.run(cmd, env=worker_env(), cwd=tmp_dir, capture_output=True, text=True, timeout=timeout)
            out, err, rc = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as exc:
            out, err, rc = _text(exc.stdout), _text(exc.stderr), "timeout"
        last_case = None
        for line in out.splitlines():
            if line.startswith("CASE "):
                last_case = line[len("CASE ") :]
            elif line.startswith("SUMMARY "):
                summary = json.loads(line[len("SUMMARY ") :])
                results[summary["target"]] = summary
                todo.remove(summary["target"])
                last_case = None
        if rc == 0 and not todo:
            break
        if not todo:
            break
        if rc == 0:
            raise RuntimeError(f"the fuzz worker ended without summaries for {todo}:\n{err[-3000:]}")
        # The first target without a summary is the one that died.
        results[todo[0]] = {"target": todo[0], "crashed": rc, "last_case": last_case, "stderr": err[-1500:]}
        todo.pop(0)
    return results


@pytest.fixture(scope="module")
def fuzz_results(tmp_path_factory):
    return run_fuzz(TARGETS, str(tmp_path_factory.mktemp("fuzz")))


def _summary(fuzz_results, target):
    res = fuzz_results[target]
    if res.get("missing"):
        pytest.fail(f"{target}: {ND_SKIP}")
    if "crashed" in res:
        rc = res["crashed"]
        if isinstance(rc, int) and rc < 0:
            rc = f"signal {-rc}"
        pytest.fail(f"{target}: the process died ({rc}) on the case {res['last_case']}\n{res['stderr'][-500:]}", pytrace=False)
    return res


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz(target, fuzz_results):
    res = _summary(fuzz_results, target)
    if res["failure"]:
        pytest.fail(f"{target}: {res['failure']}", pytrace=False)


def test_fuzz_exercised_every_op(fuzz_results):
    """What the fuzz actually ran, per target: non-empty valid results compared
    with torch / the exact reference, calls that raised, values at the limits."""
    missing, weak = [], []
    for target in TARGETS:
        res = fuzz_results[target]
        if res.get("missing"):
            missing.append(target)
            continue
        if "crashed" in res:
            weak.append(f"{target}: crashed")
            continue
        st = res["stats"]
        n = st["examples"]
        print(f"{target}: {json.dumps({k: v for k, v in st.items() if not k.startswith('meaningless_ex')})}")
        if st["valid_nonempty"] < 10:
            weak.append(f"{target}: only {st['valid_nonempty']} of {n} examples computed a non-empty valid result")
        if st["raised"] < 5:
            weak.append(f"{target}: only {st['raised']} examples raised")
        if st["extreme"] < 5:
            weak.append(f"{target}: only {st['extreme']} examples had values at the limits")
        if target != "nn" and st["extreme_computed"] + st["extreme_raised"] < 5:
            weak.append(f"{target}: too few limit cases judged")
    assert not weak, weak
    if missing:
        pytest.fail(f"not fuzzed: {missing}: {ND_SKIP}")


def test_fuzz_meaningless_cases(fuzz_results):
    """Where torch returned a tensor for geometry that breaks its own rules, the
    input was empty (an empty batch or no channels: torch skips its checks then);
    we raised (test_fuzz)."""
    reasons = {}
    for target in TARGETS:
        res = fuzz_results[target]
        if res.get("missing") or "crashed" in res:
            continue
        st = res["stats"]
        assert st["meaningless_with_data"] == 0, (target, st["meaningless_examples"])
        for k, v in st["meaningless_reasons"].items():
            reasons[k] = reasons.get(k, 0) + v
    print("torch accepted meaningless geometry (empty input):", reasons)
