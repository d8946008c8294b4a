"""Reliability: no argument crashes the process or returns a wrong tensor, and
memory stays under the workspace limit.

  1. geometry at the int32 / int64 limits, for every op: a ValueError naming the
     argument, never a tensor computed from a wrapped size, never a crash;
  2. dtypes: exactly float16 / bfloat16 / float32 / float64; integers, bool,
     complex and float8 get a TypeError naming the argument, 1x1 kernels too;
  3. degenerate shapes (zero channels, zero batch, zero-size groups) as torch
     does, and meaningless geometry (dilation 0, output_padding >=
     max(stride, dilation)) a ValueError, also where torch lets it through;
  4. a bounded workspace: peak memory of large layers under a small limit, and
     release_workspace();
  5. thread safety: four threads on the wide, per-sample and banded paths and
     under inference_mode, forward and backward;
  6. the caller's tensors are never modified, on success or error, forward or
     backward.

Anything that could crash runs in a child process (tests/fuzz_worker.py): all
the cases of this module run in one worker, restarted after the case that
crashed it, so a crash fails that case's test only. Expected values come from
torch in float64: torch.nn.functional where torch is exact for the arguments,
else the worker's exact-integer references (ref_*), which the fuzz checks
against torch.nn.functional."""
import json
import os
import subprocess
import sys

import pytest
import torch

import convt_ext

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS)
import fuzz_worker  # noqa: E402  (the exact-geometry rules, shared with the worker)
from fuzz_worker import Reject, exact_transposed, exact_windows  # noqa: E402

WORKER = os.path.join(TESTS, "fuzz_worker.py")
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(convt_ext.__file__)))
HAS_ND = fuzz_worker.HAS_ND
DIMS = (1, 2, 3) if HAS_ND else (2,)
ND_SKIP = "the N-d API (conv1d/conv3d, conv_transpose1d/3d, conv1d/3d_weight) is not in this build of convt_ext"

INT64_MAX = 2**63 - 1
EXTREMES = [2**31 - 1, 2**31, 2**32, 2**40, 2**62, 2**63 - 1]
NEGATIVES = [-1, -(2**31), -(2**63)]
MAX_RESTARTS = 25


# ===================================================================== the worker


def worker_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = PACKAGE_PARENT + os.pathsep + env.get("PYTHONPATH", "")
    env["CONVT_EXT_TEST_FILE"] = os.path.abspath(convt_ext.__file__)  # the worker checks it imported this one
    env.pop("CONVT_EXT_WORKSPACE_LIMIT", None)
    return env


def _text(s):
    if s is None:
        return ""
    return s.decode(errors="replace") if isinstance(s, bytes) else s


def run_cases(cases, tmp_dir, timeout=240):
    """Run `cases` in worker processes; {id: record}. A case that kills its
    worker gets {"crashed": returncode, "stderr": ...} and the worker restarts
    after it; one that hangs gets {"crashed": "timeout"}."""
    path = os.path.join(tmp_dir, "cases.json")
    with open(path, "w") as f:
        json.dump(cases, f)
    results = {}
    start, restarts = 0, 0
    while start < len(cases):
        cmd = [sys.executable, "-P", WORKER, "cases", path, str(start)]
        try:
            proc = subprocess.run(cmd, env=worker_env(), cwd=tmp_dir, capture_output=True, text=True, timeout=timeout)
            out, err, rc = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as exc:
            out, err, rc = _text(exc.stdout), _text(exc.stderr), "timeout"
        last = None
        for line in out.splitlines():
            if line.startswith("BEGIN "):
                last = int(line.split()[1])
            elif line.startswith("RESULT "):
                rec = json.loads(line[len("RESULT ") :])
                results[rec["id"]] = rec
                last = None
        if rc == 0:
            break
        if last is None:
            raise RuntimeError(f"the worker failed outside any case (rc={rc}):\n{err[-3000:]}")
        results[cases[last]["id"]] = {"id": cases[last]["id"], "crashed": rc, "stderr": err[-1500:]}
        start = last + 1
        restarts += 1
        if restarts > MAX_RESTARTS:
            for c in cases[start:]:
                results[c["id"]] = {"id": c["id"], "crashed": "not run: the worker crashed too often"}
            break
    return results


def crash_text(rec):
    rc = rec["crashed"]
    if isinstance(rc, int) and rc < 0:
        rc = f"signal {-rc}"
    return f"{rec['id']}: the process died ({rc}): {rec.get('stderr', '')[-300:]}"


def names_in(msg):
    return fuzz_worker._names_in(msg)


# ===================================================================== the cases

COMMON = """
g = torch.Generator().manual_seed(0)
def r(*s):
    return torch.randn(*s, generator=g, dtype=torch.float64)
B3 = r(3)
X1, W1, WT1, DY1, C1 = r(1, 2, 5), r(3, 2, 3), r(2, 3, 3), r(1, 3, 3), r(1, 6, 3)
X2, W2, WT2, DY2, C2 = r(1, 2, 5, 5), r(3, 2, 3, 3), r(2, 3, 3, 3), r(1, 3, 3, 3), r(1, 18, 9)
X3, W3, WT3, DY3, C3 = r(1, 2, 5, 5, 5), r(3, 2, 3, 3, 3), r(2, 3, 3, 3, 3), r(1, 3, 3, 3, 3), r(1, 54, 27)
"""

CASES = []  # every case of this module, run by one worker (see `outcomes`)
GROUPS = {}  # test group -> [(case id, expectation)]


def add_case(group, expect, call, ref=None, setup="", rtol=1e-10, atol=1e-10):
    cid = f"{group}#{len(GROUPS.get(group, []))}"
    CASES.append({"id": cid, "setup": COMMON + setup, "call": call, "ref": ref, "rtol": rtol, "atol": atol})
    GROUPS.setdefault(group, []).append((cid, expect))


def _value(D, v, form, base, tuple_only=False):
    """A geometry value: `v` in every dimension ("all": an int where D is 2,
    else a D-tuple) or in the last one only ("one", the others `base`)."""
    if form == "all":
        return v if (D == 2 and not tuple_only) else (v,) * D
    return (base,) * (D - 1) + (v,)


def _listed(D, v):
    return list(v) if isinstance(v, tuple) else [v] * D


def _expect_direct(image, kernel, s, p, d, numel_per_window, image_name="input"):
    """("raise", names) / ("either", None) / ("toolarge", names) for a direct
    window op, from exact integer arithmetic."""
    try:
        windows = exact_windows("", image, kernel, s, p, d, image_name)
    except Reject as r:
        return ("raise", r.names), None
    numel = numel_per_window * _prod(windows)
    if numel * 8 > INT64_MAX:
        return ("raise", set()), None
    if numel > 10**7:
        return ("toolarge", set()), windows
    return ("either", set()), windows


def _prod(v):
    out = 1
    for x in v:
        out *= x
    return out


def _fmt(v):
    return repr(v)


def build_overflow_cases():
    """Every op, every geometry argument, every value at the limits, in every
    dimension ("all") and in one ("one"); plus a few combinations. The
    expectation comes from exact integer arithmetic:
      raise    the geometry is invalid, or a size does not fit in int64:
               ValueError naming the argument (or what it feeds);
      either   the geometry is valid with a small result (e.g. conv2d with
               stride 2**62: one window): the exact result, or a ValueError
               naming the argument (an int64 library may refuse it);
      toolarge valid, but the result would not fit in memory (1-d only):
               a ValueError or an allocation error, never a crash."""
    for D in DIMS:
        S = [5] * D
        # 2-d: every value, in every dimension and in one; 1-d and 3-d: fewer.
        forms = {1: ["one"], 2: ["all", "one"], 3: ["all"]}[D]
        values = EXTREMES + NEGATIVES if D == 2 else [2**31 - 1, 2**32, 2**62, 2**63 - 1, -1, -(2**63)]
        X, W, WT, DY, C = (f"{n}{D}" for n in ("X", "W", "WT", "DY", "C"))
        for form in forms:
            for v in values:
                # ---- im2col / col2im
                for arg, base, lo in (("kernel_size", 3, 1), ("dilation", 1, 1), ("padding", 0, 0), ("stride", 1, 1)):
                    geo = {"kernel_size": _value(D, 3, "all", 3, True), "dilation": 1, "padding": 0, "stride": 1}
                    geo[arg] = _value(D, v, form, base, tuple_only=(arg == "kernel_size" and D != 2))
                    k, d, p, s = (_listed(D, geo[n]) for n in ("kernel_size", "dilation", "padding", "stride"))
                    expect, windows = _expect_direct(S, k, s, p, d, 2 * _prod(k))
                    expect = (expect[0], expect[1] | {arg})
                    args = ", ".join(_fmt(geo[n]) for n in ("kernel_size", "dilation", "padding", "stride"))
                    ref = f"ref_im2col({X}, {k}, {d}, {p}, {s})" if expect[0] == "either" else None
                    add_case(f"overflow-im2col-{D}d-{arg}", expect, f"convt_ext.im2col({X}, {args})", ref, rtol=0, atol=0)
                    # col2im onto a 5^D image from the 3^D windows of the base geometry.
                    osz = _value(D, 5, "all", 5, True)
                    expect_c, windows = _expect_direct(S, k, s, p, d, 2 * 5**D, "output_size")
                    if expect_c[0] in ("either", "toolarge") and _prod(windows) != 3**D:
                        expect_c = ("raise", {"input"})  # L no longer matches: still an error
                    expect_c = (expect_c[0], expect_c[1] | {arg})
                    ref = f"ref_col2im({C}, {[5] * D}, {k}, {d}, {p}, {s})" if expect_c[0] == "either" else None
                    add_case(f"overflow-col2im-{D}d-{arg}", expect_c, f"convt_ext.col2im({C}, {osz!r}, {args})", ref)
                # col2im output_size
                osz = _value(D, v, form, 5, True)
                o = _listed(D, osz)
                k3 = _value(D, 3, "all", 3, True)
                expect, windows = _expect_direct(o, [3] * D, [1] * D, [0] * D, [1] * D, 2 * _prod(o), "output_size")
                if expect[0] != "raise" and _prod(windows) != 3**D:
                    expect = ("raise", {"input"})
                expect = (expect[0], expect[1] | {"output_size"})
                add_case(f"overflow-col2im-{D}d-output_size", expect, f"convt_ext.col2im({C}, {osz!r}, {k3!r})")

                # ---- conv{D}d
                for arg, base in (("stride", 1), ("padding", 0), ("dilation", 1)):
                    geo = {"stride": 1, "padding": 0, "dilation": 1}
                    geo[arg] = _value(D, v, form, base)
                    s, p, d = (_listed(D, geo[n]) for n in ("stride", "padding", "dilation"))
                    expect, windows = _expect_direct(S, [3] * D, s, p, d, 3)
                    expect = (expect[0], expect[1] | {arg})
                    call = f"convt_ext.conv{D}d({X}, {W}, B3, {geo['stride']!r}, {geo['padding']!r}, {geo['dilation']!r})"
                    ref = f"ref_conv({X}, {W}, B3, {s}, {p}, {d}, 1)" if expect[0] == "either" else None
                    add_case(f"overflow-conv{D}d-{arg}", expect, call, ref)
                    # the module
                    if v > 0:
                        setup = f"M = convt_ext.nn.Conv{D}d(2, 3, 3, stride={geo['stride']!r}, padding={geo['padding']!r}, dilation={geo['dilation']!r}).double()\n"
                        ref = f"ref_conv({X}, M.weight.detach(), M.bias.detach(), {s}, {p}, {d}, 1)" if expect[0] == "either" else None
                        add_case(f"overflow-nn.Conv{D}d-{arg}", expect, f"M({X})", ref, setup=setup)
                    # ---- conv{D}d_weight: grad_output has the base geometry's 3^D windows
                    # (the input's own windows are never materialised: only
                    # their count per dimension must fit, and be >= grad_output's)
                    try:
                        windows = exact_windows("", S, [3] * D, s, p, d)
                        expect_w = ("either", set()) if min(windows) >= 3 else ("raise", {"grad_output"})
                    except Reject as r:
                        expect_w = ("raise", r.names)
                    expect_w = (expect_w[0], expect_w[1] | {arg})
                    wsize = (3, 2) + (3,) * D
                    call = f"convt_ext.conv{D}d_weight({X}, {wsize}, {DY}, {geo['stride']!r}, {geo['padding']!r}, {geo['dilation']!r})"
                    ref = f"ref_conv_weight({X}, {list(wsize)}, {DY}, {s}, {p}, {d}, 1)" if expect_w[0] == "either" else None
                    add_case(f"overflow-conv{D}d_weight-{arg}", expect_w, call, ref)
                # a kernel at the limits: conv_weight's weight_size, conv's weight (an expanded view)
                if v > 0:
                    kern = [3] * (D - 1) + [v]
                    wsize = (3, 2) + tuple(kern)
                    expect = ("raise", {"weight_size", "kernel_size"})
                    add_case(f"overflow-conv{D}d_weight-weight_size", expect, f"convt_ext.conv{D}d_weight({X}, {wsize}, {DY})")
                    if 3 * 2 * _prod(kern) <= INT64_MAX:
                        setup = f"WK = torch.zeros({(1,) * (D + 2)}, dtype=torch.float64).expand(3, 2, *{kern})\n"
                        add_case(f"overflow-conv{D}d-kernel", ("raise", {"weight", "kernel_size"}), f"convt_ext.conv{D}d({X}, WK, B3)", setup=setup)

                # ---- conv_transpose{D}d
                for arg, base in (("stride", 1), ("padding", 0), ("output_padding", 0), ("dilation", 1)):
                    geo = {"stride": 1, "padding": 0, "output_padding": 0, "dilation": 1}
                    geo[arg] = _value(D, v, form, base)
                    add_transposed_case(D, geo, {arg})
        # combinations: output_padding just under a huge stride / dilation
        for v in (2**31, 2**32, 2**62, 2**63 - 1):
            add_transposed_case(D, {"stride": v, "padding": 0, "output_padding": v - 1, "dilation": 1}, {"stride", "output_padding"})
            add_transposed_case(D, {"stride": 1, "padding": 0, "output_padding": v - 1, "dilation": v}, {"dilation", "output_padding"})
            add_transposed_case(D, {"stride": v, "padding": v // 2, "output_padding": 0, "dilation": 1}, {"stride", "padding"})
        # valid geometry with a huge stride and a small result: one input
        # position (transposed) or one window (col2im): the exact result or a
        # ValueError naming stride, never a crash.
        ones = ", ".join(["1"] * D)
        setup = f"XS = r(1, 2, {ones}); WS1 = r(2, 3, {ones}); CS = r(1, {2 * 3**D}, 1); CS1 = r(1, 2, 1)\n"
        for v in (2**31 - 1, 2**32, 2**40, 2**62, 2**63 - 1):
            vs = v if D == 2 else (v,) * D
            for w, k in ((f"WT{D}", 3), ("WS1", 1)):
                call = f"convt_ext.conv_transpose{D}d(XS, {w}, B3, {vs!r})"
                ref = f"ref_conv_transpose(XS, {w}, B3, {[v] * D}, {[0] * D}, {[0] * D}, 1, {[1] * D})"
                add_case(f"overflow-valid-huge-stride-conv_transpose{D}d", ("either", {"stride"}), call, ref, setup=setup)
            for c, k, o in (("CS", 3, 3), ("CS1", 1, 1), ("CS", 3, 4)):
                ks, os_ = (k, o) if D == 2 else ((k,) * D, (o,) * D)
                call = f"convt_ext.col2im({c}, {os_!r}, {ks!r}, 1, 0, {vs!r})"
                ref = f"ref_col2im({c}, {[o] * D}, {[k] * D}, {[1] * D}, {[0] * D}, {[v] * D})"
                add_case(f"overflow-valid-huge-stride-col2im-{D}d", ("either", {"stride"}), call, ref, setup=setup)
            call = f"convt_ext.conv{D}d(XS, W{D}, B3, {vs!r}, 1)"
            ref = f"ref_conv(XS, W{D}, B3, {[v] * D}, {[1] * D}, {[1] * D}, 1)"
            add_case(f"overflow-valid-huge-stride-conv{D}d", ("either", {"stride"}), call, ref, setup=setup)
        # outputs whose element count fits in int64 but whose size in bytes
        # does not (about 2**61.5 elements): a ValueError, not an allocator error
        side = round(2 ** (61.5 / D))
        P, S2 = (side - 1) // 2, side - 1
        ones = ", ".join(["1"] * D)
        setup = f"XO = r(1, 1, {ones}); WO = r(1, 1, {ones}); X2S = r(1, 1, {', '.join(['2'] * D)})\n"
        k1 = 1 if D == 2 else (1,) * D
        add_case(f"overflow-bytes-{D}d", ("raise", {"padding"}), f"convt_ext.conv{D}d(XO, WO, None, 1, {P})", setup=setup)
        add_case(f"overflow-bytes-{D}d", ("raise", {"padding"}), f"convt_ext.im2col(XO, {k1!r}, 1, {P})", setup=setup)
        add_case(f"overflow-bytes-{D}d", ("raise", {"stride"}), f"convt_ext.conv_transpose{D}d(X2S, WO, None, {S2})", setup=setup)
        add_case(f"overflow-bytes-{D}d", ("raise", {"dilation"}), f"convt_ext.conv_transpose{D}d(XO, r(1, 1, {', '.join(['2'] * D)}), None, 1, 0, 0, 1, {S2})", setup=setup)
        # direct convs whose padded size overflows while stride brings the windows back to a few
        for v in (2**62, 2**63 - 1):
            call = f"convt_ext.conv{D}d(X{D}, W{D}, B3, {v}, {v // 2}, 1)"
            add_case(f"overflow-conv{D}d-stride+padding", ("raise", {"padding", "stride"}), call)


def add_transposed_case(D, geo, names):
    S = [5] * D
    s, p, op, d = (_listed(D, geo[n]) for n in ("stride", "padding", "output_padding", "dilation"))
    try:
        sizes = exact_transposed(S, [3] * D, s, p, op, d)
        numel = 3 * _prod(sizes)
        if numel * 8 > INT64_MAX:
            expect = ("raise", set(names))
        elif numel > 10**7:
            expect = ("toolarge", set(names))
        else:
            expect = ("either", set(names))
    except Reject as r:
        expect = ("raise", r.names | set(names))
    call = f"convt_ext.conv_transpose{D}d(X{D}, WT{D}, B3, {geo['stride']!r}, {geo['padding']!r}, {geo['output_padding']!r}, 1, {geo['dilation']!r})"
    ref = f"ref_conv_transpose(X{D}, WT{D}, B3, {s}, {p}, {op}, 1, {d})" if expect[0] == "either" else None
    group = f"overflow-conv_transpose{D}d-{'+'.join(sorted(names))}"
    add_case(group, expect, call, ref)
    if all(x > 0 for x in s + d) and all(x >= 0 for x in p + op):
        setup = (
            f"M = convt_ext.nn.ConvTranspose{D}d(2, 3, 3, stride={geo['stride']!r}, padding={geo['padding']!r}, "
            f"output_padding={geo['output_padding']!r}, dilation={geo['dilation']!r}).double()\n"
        )
        ref = f"ref_conv_transpose(X{D}, M.weight.detach(), M.bias.detach(), {s}, {p}, {op}, 1, {d})" if expect[0] == "either" else None
        add_case(f"overflow-nn.ConvTranspose{D}d-{'+'.join(sorted(names))}", expect, f"M(X{D})", ref, setup=setup)


def build_unrepresentable_cases():
    """Python ints beyond int64: an exception (ValueError, TypeError or
    OverflowError), never a crash or a tensor."""
    for v in (2**63, 2**64, -(2**63) - 1, 10**30):
        for call in (
            f"convt_ext.im2col(X2, 3, 1, {v}, 1)",
            f"convt_ext.col2im(C2, 5, 3, 1, 0, {v})",
            f"convt_ext.conv2d(X2, W2, B3, {v})",
            f"convt_ext.conv_transpose2d(X2, WT2, B3, 1, 0, {v})",
            f"convt_ext.conv2d_weight(X2, (3, 2, 3, 3), DY2, 1, 0, {v})",
            f"convt_ext.conv2d(X2, W2, B3, 1, 0, 1, {v})",
        ):
            add_case("unrepresentable", ("anyerror", set()), call)


BAD_DTYPES_ND = ["torch.int32", "torch.int64", "torch.bool", "torch.complex64", "torch.float8_e4m3fn", "torch.float8_e5m2"]
BAD_DTYPES = [
    "torch.int8",
    "torch.uint8",
    "torch.int32",
    "torch.int64",
    "torch.bool",
    "torch.complex64",
    "torch.complex128",
    "torch.float8_e4m3fn",
    "torch.float8_e5m2",
]
# im2col and col2im take every bool, integer, floating and complex dtype (tests/test_dtypes.py);
# col2im no float8 or complex32 (torch has no sum for them); neither packed float4 nor raw bits.
BAD_WINDOW_DTYPES = {
    "im2col": ["torch.float4_e2m1fn_x2", "torch.bits8"],
    "col2im": ["torch.float8_e4m3fn", "torch.float8_e5m2", "torch.complex32", "torch.bits8"],
}
UNCONVERTIBLE = ("torch.float4_e2m1fn_x2", "torch.bits8")  # .to() refuses them: made empty
GOOD_DTYPES = {"torch.float16": 2e-2, "torch.bfloat16": 8e-2, "torch.float32": 1e-5, "torch.float64": 1e-10}


def _bad(name, dt):
    if dt in UNCONVERTIBLE:
        return f"torch.empty({name}.shape, dtype={dt})"
    return f"({name} > 0)" if dt == "torch.bool" else f"{name}.to({dt})"


def dtype_ops(D):
    """(op label, {argument: tensor expression}, call template, reference template)."""
    X, W, WT, DY, C = (f"{n}{D}" for n in ("X", "W", "WT", "DY", "C"))
    k = 3 if D == 2 else (3,) * D
    k1 = 1 if D == 2 else (1,) * D
    wsize = (3, 2) + (3,) * D
    w1 = (3, 2) + (1,) * D
    ops = [
        (f"im2col-{D}d", {"input": X}, "convt_ext.im2col({input}, %r, 1, 1, 2)" % (k,), f"ref_im2col({{input}}.double(), {[3] * D}, {[1] * D}, {[1] * D}, {[2] * D})"),
        (f"im2col-{D}d-1x1", {"input": X}, "convt_ext.im2col({input}, %r)" % (k1,), f"ref_im2col({{input}}.double(), {[1] * D}, {[1] * D}, {[0] * D}, {[1] * D})"),
        (f"col2im-{D}d", {"input": C}, "convt_ext.col2im({input}, 5, %r)" % (k,) if D == 2 else "convt_ext.col2im({input}, %r, %r)" % ((5,) * D, k), f"ref_col2im({{input}}.double(), {[5] * D}, {[3] * D}, {[1] * D}, {[0] * D}, {[1] * D})"),
        (
            f"conv{D}d",
            {"input": X, "weight": W, "bias": "B3"},
            f"convt_ext.conv{D}d({{input}}, {{weight}}, {{bias}}, 2, 1)",
            f"ref_conv({{input}}.double(), {{weight}}.double(), {{bias}}.double(), {[2] * D}, {[1] * D}, {[1] * D}, 1)",
        ),
        (
            f"conv{D}d-1x1",
            {"input": X, "weight": f"{W}[..., {', '.join(['0:1'] * D)}]", "bias": "B3"},
            f"convt_ext.conv{D}d({{input}}, {{weight}}, {{bias}})",
            f"ref_conv({{input}}.double(), {{weight}}.double(), {{bias}}.double(), {[1] * D}, {[0] * D}, {[1] * D}, 1)",
        ),
        (
            f"conv_transpose{D}d",
            {"input": X, "weight": WT, "bias": "B3"},
            f"convt_ext.conv_transpose{D}d({{input}}, {{weight}}, {{bias}}, 2, 1, 1)",
            f"ref_conv_transpose({{input}}.double(), {{weight}}.double(), {{bias}}.double(), {[2] * D}, {[1] * D}, {[1] * D}, 1, {[1] * D})",
        ),
        (
            f"conv_transpose{D}d-1x1",
            {"input": X, "weight": f"{WT}[..., {', '.join(['0:1'] * D)}]", "bias": "B3"},
            f"convt_ext.conv_transpose{D}d({{input}}, {{weight}}, {{bias}})",
            f"ref_conv_transpose({{input}}.double(), {{weight}}.double(), {{bias}}.double(), {[1] * D}, {[0] * D}, {[0] * D}, 1, {[1] * D})",
        ),
        (
            f"conv{D}d_weight",
            {"input": X, "grad_output": DY},
            f"convt_ext.conv{D}d_weight({{input}}, {wsize}, {{grad_output}})",
            f"ref_conv_weight({{input}}.double(), {list(wsize)}, {{grad_output}}.double(), {[1] * D}, {[0] * D}, {[1] * D}, 1)",
        ),
        (
            f"conv{D}d_weight-1x1",
            {"input": X, "grad_output": f"{X}[:, :1].expand(1, 3, *{X}.shape[2:])"},
            f"convt_ext.conv{D}d_weight({{input}}, {w1}, {{grad_output}})",
            f"ref_conv_weight({{input}}.double(), {list(w1)}, {{grad_output}}.double(), {[1] * D}, {[0] * D}, {[1] * D}, 1)",
        ),
        (
            f"nn.Conv{D}d",
            {"input": X},
            f"convt_ext.nn.Conv{D}d(2, 3, 3, padding=1).to({{dtype}})({{input}})",
            None,
        ),
        (
            f"nn.ConvTranspose{D}d",
            {"input": X},
            f"convt_ext.nn.ConvTranspose{D}d(2, 3, 3, stride=2).to({{dtype}})({{input}})",
            None,
        ),
    ]
    return ops


def build_dtype_cases():
    for D in DIMS:
        for label, tensors, call, ref in dtype_ops(D):
            for arg in tensors:
                window = label.split("-")[0]
                for dt in BAD_WINDOW_DTYPES.get(window) or (BAD_DTYPES if D == 2 else BAD_DTYPES_ND):
                    vals = dict(tensors)
                    vals[arg] = _bad(tensors[arg], dt)
                    vals["dtype"] = "torch.float64"
                    add_case(f"dtype-bad-{label}-{arg}", ("typeerror", {arg}), call.format(**vals))
            # mixed float dtypes: the second tensor in float32
            args = list(tensors)
            if len(args) > 1:
                for arg in args[1:]:
                    vals = dict(tensors)
                    vals[arg] = f"{tensors[arg]}.float()"
                    vals["dtype"] = "torch.float64"
                    add_case(f"dtype-mixed-{label}-{arg}", ("typeerror", {arg}), call.format(**vals))
            # every accepted dtype: the result in that dtype, close to the float64 reference
            for dt, tol in GOOD_DTYPES.items():
                vals = {a: f"{t}.to({dt})" for a, t in tensors.items()}
                vals["dtype"] = dt
                if ref is None:
                    continue
                rvals = {a: f"{t}.to({dt})" for a, t in tensors.items()}
                add_case(f"dtype-good-{label}", ("dtype", dt), call.format(**vals), ref.format(**rvals), rtol=tol, atol=tol)


def build_degenerate_cases():
    """Zero channels, zero batch, zero-size groups; meaningless geometry."""
    for D in DIMS:
        sp = ", ".join(["5"] * D)
        k3 = ", ".join(["3"] * D)
        osp = ", ".join(["3"] * D)
        tconv = {1: "F.conv1d", 2: "F.conv2d", 3: "F.conv3d"}[D]
        tconvt = {1: "F.conv_transpose1d", 2: "F.conv_transpose2d", 3: "F.conv_transpose3d"}[D]
        tconvw = f"torch_conv{D}d_weight"
        # ---- zero input channels: torch's F.convNd returns (N, 0, *out) whatever
        # weight.size(0) is; the right answer, (N, C_out, *out) filled with the
        # bias (zeros without one), is what a zero-valued channel gives.
        for groups, cout in ((1, 3), (2, 4)):
            for bias in ("B", "None"):
                setup = f"X0 = r(2, 0, {sp}); W0 = r({cout}, 0, {k3}); B = r({cout})\n"
                ref = f"{tconv}(torch.zeros(2, {groups}, {sp}, dtype=torch.float64), torch.zeros({cout}, 1, {k3}, dtype=torch.float64), {bias}, 1, 1, 1, {groups})"
                add_case(f"zero-channels-conv{D}d", ("result", None), f"convt_ext.conv{D}d(X0, W0, {bias}, 1, 1, 1, {groups})", ref, setup=setup)
            # 1x1 kernel (the direct path)
            setup = f"X0 = r(2, 0, {sp}); W0 = r({cout}, 0, {', '.join(['1'] * D)}); B = r({cout})\n"
            ref = f"B.reshape(1, -1, {', '.join(['1'] * D)}).expand(2, {cout}, {sp})"
            add_case(f"zero-channels-conv{D}d", ("result", None), f"convt_ext.conv{D}d(X0, W0, B, 1, 0, 1, {groups})", ref, setup=setup)
        # backward through zero channels: bias gradient = sum of grad_output, empty others
        setup = (
            f"X0 = r(2, 0, {sp}); W0 = r(3, 0, {k3}); B = r(3); G0 = r(2, 3, {osp})\n"
            f"Y = {tconv}(torch.zeros(2, 1, {sp}, dtype=torch.float64), torch.zeros(3, 1, {k3}, dtype=torch.float64), B)\n"
        )
        ref = f"[Y, torch.zeros(2, 0, {sp}, dtype=torch.float64), torch.zeros(3, 0, {k3}, dtype=torch.float64), G0.sum(dim={tuple([0] + list(range(2, D + 2)))})]"
        add_case(f"zero-channels-conv{D}d", ("result", None), f"fwd_bwd(lambda x, w, b: convt_ext.conv{D}d(x, w, b), [X0, W0, B], G0)", ref, setup=setup)
        # transposed: torch refuses a weight with zero rows; the right answer is the bias
        setup = f"X0 = r(2, 0, {sp}); W0 = r(0, 3, {k3}); B = r(3)\n"
        ref = f"B.reshape(1, -1, {', '.join(['1'] * D)}).expand(2, 3, {', '.join(['7'] * D)})"
        add_case(f"zero-channels-conv_transpose{D}d", ("result_or_valueerror", {"input", "weight", "channels"}), f"convt_ext.conv_transpose{D}d(X0, W0, B)", ref, setup=setup)
        setup = f"X0 = r(2, 0, {sp}); G0 = r(2, 3, {osp})\n"
        add_case(
            f"zero-channels-conv{D}d_weight", ("result", None), f"convt_ext.conv{D}d_weight(X0, (3, 0, {k3}), G0)", f"{tconvw}(X0, (3, 0, {k3}), G0)", setup=setup
        )
        add_case(f"zero-channels-conv{D}d_weight", ("result", None), f"convt_ext.conv{D}d_weight(X0, (4, 0, {k3}), G0.repeat(1, 2, *[1] * {D})[:, :4], 1, 0, 1, 2)", f"torch.zeros(4, 0, {k3}, dtype=torch.float64)", setup=setup)
        # zero output channels: torch refuses; the right answer is empty
        setup = f"W0 = r(0, 2, {k3})\n"
        add_case(f"zero-out-channels-conv{D}d", ("result_or_valueerror", {"weight", "channels", "out_channels"}), f"convt_ext.conv{D}d(X{D}, W0)", f"torch.zeros(1, 0, {osp}, dtype=torch.float64)", setup=setup)
        setup = f"W0 = r(2, 0, {k3})\n"
        add_case(f"zero-out-channels-conv_transpose{D}d", ("result_or_valueerror", {"weight", "channels", "out_channels"}), f"convt_ext.conv_transpose{D}d(X{D}, W0)", f"torch.zeros(1, 0, {', '.join(['7'] * D)}, dtype=torch.float64)", setup=setup)
        # zero batch: every op as torch
        setup = f"XN = r(0, 2, {sp}); GN = r(0, 3, {osp}); CN = r(0, {2 * 3**D}, {3**D})\n"
        k = "3" if D == 2 else f"({k3},)"
        osz = "5" if D == 2 else f"({sp},)"
        for call, ref in (
            (f"convt_ext.conv{D}d(XN, W{D}, B3, 1, 0)", f"{tconv}(XN, W{D}, B3, 1, 0)"),
            (f"convt_ext.conv{D}d(XN, W{D}, B3, 2, 1, 1)", f"{tconv}(XN, W{D}, B3, 2, 1, 1)"),
            (f"convt_ext.conv_transpose{D}d(XN, WT{D}, B3, 2, 1, 1)", f"{tconvt}(XN, WT{D}, B3, 2, 1, 1)"),
            (f"convt_ext.conv{D}d_weight(XN, (3, 2, {k3}), GN)", f"{tconvw}(XN, (3, 2, {k3}), GN)"),
            (f"convt_ext.im2col(XN, {k})", f"ref_im2col(XN, {[3] * D}, {[1] * D}, {[0] * D}, {[1] * D})"),
            (f"convt_ext.col2im(CN, {osz}, {k})", f"ref_col2im(CN, {[5] * D}, {[3] * D}, {[1] * D}, {[0] * D}, {[1] * D})"),
        ):
            add_case(f"zero-batch-{D}d", ("result", None), call, ref, setup=setup)
        # ---- meaningless geometry: a ValueError naming the argument, also with
        # an empty batch (where torch skips its own checks and returns a tensor).
        for xname in (f"X{D}", "XN"):
            for call, arg in (
                (f"convt_ext.conv{D}d({xname}, W{D}, None, 1, 0, 0)", "dilation"),
                (f"convt_ext.conv_transpose{D}d({xname}, WT{D}, None, 1, 0, 0, 1, 0)", "dilation"),
                (f"convt_ext.conv{D}d_weight({xname}, (3, 2, {k3}), {'DY%d' % D if xname != 'XN' else 'GN'}, 1, 0, 0)", "dilation"),
                (f"convt_ext.im2col({xname}, {k}, 0)", "dilation"),
                (f"convt_ext.conv{D}d({xname}, W{D}, None, 0)", "stride"),
                (f"convt_ext.conv{D}d({xname}, W{D}, None, 1, -1)", "padding"),
                (f"convt_ext.conv{D}d({xname}, W{D}, None, 1, 0, 1, 0)", "groups"),
                # output_padding >= max(stride, dilation)
                (f"convt_ext.conv_transpose{D}d({xname}, WT{D}, None, 2, 0, 2)", "output_padding"),
                (f"convt_ext.conv_transpose{D}d({xname}, WT{D}, None, 2, 0, 3, 1, 3)", "output_padding"),
                (f"convt_ext.conv_transpose{D}d({xname}, WT{D}, None, 1, 0, 1)", "output_padding"),
                (f"convt_ext.conv_transpose{D}d({xname}, WT{D}, None, 1, 0, -1)", "output_padding"),
                # an output of size 0 or less
                (f"convt_ext.conv_transpose{D}d({xname}, WT{D}, None, 1, 4)", "padding"),
            ):
                add_case(f"meaningless-{D}d", ("raise", {arg}), call, setup=setup)
        add_case(f"meaningless-{D}d", ("raise", {"dilation"}), f"convt_ext.col2im(C{D}, {osz}, {k}, 0)")
        # torch's own modules refuse output_padding >= stride at construction;
        # ours (torch's constructors) too, and the forward with it set anyway must refuse.
        setup2 = setup + f"M = convt_ext.nn.ConvTranspose{D}d(2, 3, 3, stride=2).double(); M.output_padding = (2,) * {D}\n"
        add_case(f"meaningless-{D}d", ("raise", {"output_padding"}), "M(XN)", setup=setup2)


def build_mutation_cases():
    """Forward and backward on the caller's own tensors (leaves, views,
    non-contiguous, 1x1 kernels, grad_output): nothing of theirs changes; and
    the results are right. (Every other case checks this too, errors included.)"""
    for D in DIMS:
        sp = ", ".join(["6"] * D)
        k3 = ", ".join(["3"] * D)
        tconv = {1: "F.conv1d", 2: "F.conv2d", 3: "F.conv3d"}[D]
        tconvt = {1: "F.conv_transpose1d", 2: "F.conv_transpose2d", 3: "F.conv_transpose3d"}[D]
        setup = (
            f"BASE = r(3, 4, {', '.join(['13'] * D)})\n"
            f"XV = BASE[::2, :, {', '.join(['1::2'] * D)}]\n"  # a strided view (2, 4, 6, ...)
            f"XC = r(2, 4, {sp})\n"
            + (f"XT = r(2, 4, {sp}).transpose(-1, -2)\n" if D > 1 else "XT = r(2, 6, 4).transpose(1, 2)\n")
            + f"W = r(6, 2, {k3}); W1 = r(6, 2, {', '.join(['1'] * D)}); B = r(6)\n"
            f"WTr = r(4, 3, {k3}); WT1 = r(4, 3, {', '.join(['1'] * D)}); B6 = r(6)\n"
        )
        wc = fuzz_worker.window_count
        ts = fuzz_worker.transposed_size

        def shape(*dims):
            return ", ".join(str(v) for v in dims)

        # conv: a strided view with a 3^D kernel; a transposed view with a 1x1 kernel (the direct path)
        for xn, wn, geo, out in (("XV", "W", "2, 1, 1, 2", wc(6, 3, 2, 1, 1)), ("XT", "W1", "1, 0, 1, 2", 6)):
            call = f"fwd_bwd(lambda x, w, b: convt_ext.conv{D}d(x, w, b, {geo}), [{xn}, {wn}, B], G)"
            ref = f"torch_fwd_bwd(lambda x, w, b: {tconv}(x, w, b, {geo}), [{xn}, {wn}, B], G)"
            add_case(f"unchanged-conv{D}d", ("result", None), call, ref, setup=setup + f"G = r(2, 6, {shape(*[out] * D)})\n")
        for xn, wn, geo, out in (("XT", "WTr", "2, 1, 1, 2", ts(6, 3, 2, 1, 1, 1)), ("XV", "WT1", "1, 0, 0, 2", 6)):
            call = f"fwd_bwd(lambda x, w, b: convt_ext.conv_transpose{D}d(x, w, b, {geo}), [{xn}, {wn}, B6], G)"
            ref = f"torch_fwd_bwd(lambda x, w, b: {tconvt}(x, w, b, {geo}), [{xn}, {wn}, B6], G)"
            add_case(f"unchanged-conv_transpose{D}d", ("result", None), call, ref, setup=setup + f"G = r(2, 6, {shape(*[out] * D)})\n")
        # the weight gradient op itself (and its own backward), with the caller's grad_output
        call = f"fwd_bwd(lambda x, g: convt_ext.conv{D}d_weight(x, W.shape, g, 1, 1, 1, 2), [XV, GY], GW)"
        ref = f"torch_fwd_bwd(lambda x, g: torch_conv{D}d_weight(x, W.shape, g, 1, 1, 1, 2), [XV, GY], GW)"
        add_case(f"unchanged-conv{D}d_weight", ("result", None), call, ref, setup=setup + f"GY = r(2, 6, {sp}); GW = r(*W.shape)\n")
        # im2col / col2im and their backwards
        k = "(3, 2)" if D == 2 else repr((3,) * D)
        kl = [3, 2] if D == 2 else [3] * D
        L = 1
        for kk in kl:
            L *= wc(6, kk, 1, 1, 1)
        ones = [1] * D
        cols = f"ref_im2col(XT, {kl}, {ones}, {ones}, {ones})"
        call = f"fwd_bwd(lambda x: convt_ext.im2col(x, {k}, 1, 1, 1), [XT], GC)"
        ref = f"[{cols}, ref_col2im(GC, list(XT.shape[2:]), {kl}, {ones}, {ones}, {ones})]"
        add_case(f"unchanged-im2col{D}d", ("result", None), call, ref, setup=setup + f"GC = r(2, {4 * (6 if D == 2 else 3 ** D)}, {L})\n")
        call = f"fwd_bwd(lambda c: convt_ext.col2im(c, tuple(XV.shape[2:]), {k}, 1, 1, 1), [CC], XV)"
        ref = f"[ref_col2im(CC, list(XV.shape[2:]), {kl}, {ones}, {ones}, {ones}), ref_im2col(XV, {kl}, {ones}, {ones}, {ones})]"
        add_case(f"unchanged-col2im{D}d", ("result", None), call, ref, setup=setup + f"CC = r(2, {4 * (6 if D == 2 else 3 ** D)}, {L})\n")
        # error paths with tensors that require grad
        for call in (
            f"convt_ext.conv{D}d(XC.requires_grad_(), W, B, 1, 0, 1, 3)",
            f"convt_ext.conv{D}d(XC, W.requires_grad_(), B, 0)",
            f"convt_ext.conv_transpose{D}d(XC, WTr, B6, 2, 0, 5)",
            f"convt_ext.conv{D}d_weight(XC, W.shape, r(2, 6, {', '.join(['9'] * D)}), 1, 0, 1, 2)",
            f"convt_ext.im2col(XC, {'3' if D == 2 else (3,) * D}, 1, -1)",
        ):
            add_case(f"unchanged-errors-{D}d", ("raise", set()), call, setup=setup)


add_case(
    "known-sigfpe",
    ("raise", {"stride"}),
    "convt_ext.conv_transpose2d(torch.randn(1, 2, 5, 5), torch.randn(2, 2, 3, 3), None, stride=2**62)",
)
add_case("known-im2col-padding", ("raise", {"padding"}), "convt_ext.im2col(torch.randn(1, 2, 5, 5), 3, 1, padding=2**63 - 1, stride=1)")
build_overflow_cases()
build_unrepresentable_cases()
build_dtype_cases()
build_degenerate_cases()
build_mutation_cases()


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    return run_cases(CASES, str(tmp_path_factory.mktemp("reliability")))


# ===================================================================== judging


def problems_of(cid, expect, rec):
    """What is wrong with one case's record, as a list of strings."""
    if rec is None:
        return [f"{cid}: no result"]
    if "crashed" in rec:
        return [crash_text(rec)]
    if "setup_error" in rec:
        return [f"{cid}: TEST SETUP ERROR {rec['setup_error']}"]
    out = []
    call = rec["id"]
    kind, names = expect
    exc, msg = rec.get("exc"), rec.get("msg", "")
    if rec.get("mutated"):
        out.append(f"{call}: changed the caller's tensors {rec['mutated']}")
    got = f"raised {exc}: {msg[:300]}" if exc else f"returned {rec.get('out')}"
    if kind == "raise":
        if exc != "ValueError":
            out.append(f"{call}: want ValueError, {got}")
        elif names and not (names & names_in(msg)):
            out.append(f"{call}: the ValueError names none of {sorted(names)}: {msg[:300]}")
    elif kind == "either":
        if exc is not None:
            if exc != "ValueError":
                out.append(f"{call}: want the exact result or a ValueError, {got}")
            elif not (names & names_in(msg)):
                out.append(f"{call}: the ValueError names none of {sorted(names)}: {msg[:300]}")
        elif not rec.get("cmp", {}).get("close"):
            out.append(f"{call}: wrong result ({rec.get('cmp', {}).get('why')}); out {rec.get('out')}, ref {rec.get('ref')}")
    elif kind == "toolarge":
        if exc is None:
            out.append(f"{call}: {got}")
        elif exc == "ValueError":
            pass
        elif not (exc in ("RuntimeError", "MemoryError") and ("alloc" in msg.lower() or "memory" in msg.lower())):
            out.append(f"{call}: want a ValueError or an allocation error, {got}")
    elif kind == "anyerror":
        if exc not in ("ValueError", "TypeError", "OverflowError"):
            out.append(f"{call}: want ValueError/TypeError/OverflowError, {got}")
    elif kind == "typeerror":
        if exc != "TypeError":
            out.append(f"{call}: want TypeError, {got}")
        elif not (names & names_in(msg)):
            out.append(f"{call}: the TypeError names none of {sorted(names)}: {msg[:300]}")
    elif kind == "dtype":
        if exc is not None:
            out.append(f"{call}: {got}")
        else:
            want = str(getattr(torch, names.split(".")[1]))
            if rec["out"]["dtypes"] != [want]:
                out.append(f"{call}: result dtype {rec['out']['dtypes']}, want {want}")
            if not rec.get("cmp", {}).get("close"):
                out.append(f"{call}: not close to the float64 reference: {rec.get('cmp', {}).get('why')}")
    elif kind == "result":
        if exc is not None:
            out.append(f"{call}: {got}")
        elif not rec.get("cmp", {}).get("close"):
            out.append(f"{call}: {rec.get('cmp', {}).get('why')}; out {rec.get('out')}, want {rec.get('ref')}")
    elif kind == "result_or_valueerror":
        if exc is not None:
            if exc != "ValueError":
                out.append(f"{call}: want the right result or a ValueError, {got}")
        elif not rec.get("cmp", {}).get("close"):
            out.append(f"{call}: {rec.get('cmp', {}).get('why')}; out {rec.get('out')}, want {rec.get('ref')}")
    else:  # pragma: no cover
        raise AssertionError(kind)
    return out


def check_group(outcomes, group):
    problems = []
    for cid, expect in GROUPS[group]:
        problems += problems_of(cid, expect, outcomes.get(cid))
    if problems:
        case_of = {c["id"]: c for c in CASES}
        lines = []
        for p in problems[:12]:
            cid = p.split(":")[0]
            call = case_of.get(cid, {}).get("call", "")
            lines.append(f"{p}\n      call: {call}")
        pytest.fail(f"{len(problems)} of {len(GROUPS[group])} cases of {group}:\n" + "\n".join(lines), pytrace=False)


def _groups(prefix):
    return sorted(g for g in GROUPS if g.startswith(prefix))


# ===================================================================== 1. geometry at the limits


def test_case_table_covers_every_op():
    """The tables below reach every public op, in every dimension of this build."""
    calls = " ".join(c["call"] + c["setup"][len(COMMON) :] for c in CASES)
    names = ["im2col", "col2im", "conv2d", "conv_transpose2d", "conv2d_weight", "nn.Conv2d", "nn.ConvTranspose2d"]
    if HAS_ND:
        names += [f"{n}{D}d" for n in ("conv", "conv_transpose", "nn.Conv", "nn.ConvTranspose") for D in (1, 3)]
        names += ["conv1d_weight", "conv3d_weight"]
    for n in names:
        assert f"convt_ext.{n}(" in calls, n
    kinds = {e[0] for g in GROUPS for _, e in GROUPS[g] if g.startswith("overflow")}
    assert {"raise", "either"} <= kinds


@pytest.mark.parametrize("group", _groups("overflow-"))
def test_geometry_at_the_limits(group, outcomes):
    check_group(outcomes, group)


def test_known_crash_conv_transpose2d_huge_stride(outcomes):
    """The reported SIGFPE: conv_transpose2d(randn(1,2,5,5), randn(2,2,3,3), None, stride=2**62)."""
    check_group(outcomes, "known-sigfpe")


def test_known_wrapped_im2col_huge_padding(outcomes):
    """The reported wrong tensor: im2col(randn(1,2,5,5), 3, 1, padding=2**63-1, stride=1) returned (1, 18, 1)."""
    check_group(outcomes, "known-im2col-padding")


def test_unrepresentable_ints(outcomes):
    check_group(outcomes, "unrepresentable")


# ===================================================================== 2. dtypes


@pytest.mark.parametrize("group", _groups("dtype-bad-") + _groups("dtype-mixed-"))
def test_rejected_dtypes(group, outcomes):
    check_group(outcomes, group)


@pytest.mark.parametrize("group", _groups("dtype-good-"))
def test_accepted_dtypes(group, outcomes):
    check_group(outcomes, group)


# ===================================================================== 3. degenerate shapes


@pytest.mark.parametrize("group", _groups("zero-"))
def test_degenerate_shapes(group, outcomes):
    check_group(outcomes, group)


@pytest.mark.parametrize("group", _groups("meaningless-"))
def test_meaningless_geometry_is_a_value_error(group, outcomes):
    check_group(outcomes, group)


# ===================================================================== 6. the caller's tensors


@pytest.mark.parametrize("group", _groups("unchanged-"))
def test_callers_tensors_unchanged(group, outcomes):
    check_group(outcomes, group)


def test_no_case_changed_a_callers_tensor(outcomes):
    """Across every case of this module, successful or not."""
    changed = [f"{cid}: {rec['mutated']}" for cid, rec in outcomes.items() if rec.get("mutated")]
    assert not changed, changed[:10]


def test_nd_api_present():
    """The N-d API this module covers when present (functions and modules)."""
    if not HAS_ND:
        pytest.fail(ND_SKIP)
    for name in ("Conv1d", "Conv3d", "ConvTranspose1d", "ConvTranspose3d"):
        assert issubclass(getattr(convt_ext.nn, name), getattr(torch.nn, name))


# ===================================================================== 4, 5. scenarios


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
    cases = [
        {"id": "threads", "setup": "", "call": "threads_scenario(4 << 20)"},
        {"id": "threads-tiny", "setup": "", "call": "threads_scenario(1, iterations=1, nd=False, side=24)"},
        {"id": "flip", "setup": "", "call": "flip_limit_scenario()"},
        {"id": "release", "setup": "", "call": "release_scenario()"},
    ]
    return run_cases(cases, str(tmp_path_factory.mktemp("scenarios")), timeout=300)


def _value_of(rec):
    assert "crashed" not in rec, crash_text(rec)
    assert rec.get("exc") is None, f"{rec['exc']}: {rec.get('msg')}"
    return rec["value"]


@pytest.mark.parametrize("which", ["threads", "threads-tiny"])
def test_concurrent_threads(which, scenarios):
    """Four threads at once: wide path (batch 16 of 8x8), per-sample tasks
    (batch 2 of 64x64), banded (one 96x96 sample over the limit) and
    inference_mode; forward and backward; every result checked against torch.
    'threads-tiny' runs the 2-d ops with a 1-byte limit (everything banded)."""
    v = _value_of(scenarios[which])
    assert v["n_errors"] == 0, v["errors"]
    assert all(n > 0 for n in v["counts"].values()), v["counts"]
    assert v["ok_after"]


def test_workspace_limit_changes_while_threads_compute(scenarios):
    v = _value_of(scenarios["flip"])
    assert not v["errors"], v["errors"]


def test_release_workspace(scenarios):
    v = _value_of(scenarios["release"])
    assert v["exists"], "convt_ext.release_workspace() does not exist"
    assert v["returns"] == "None"
    assert v["identical_after_release"]
    assert not v["thread_errors"], v["thread_errors"]
    assert v["identical_at_end"]


# The CI's sanitizer build preloads ASan into every process, these workers too.
SANITIZED = bool(getattr(convt_ext, "build_info", dict)().get("sanitize")) or "libasan" in os.environ.get("LD_PRELOAD", "")


@pytest.fixture(scope="module")
def memory(tmp_path_factory):
    if SANITIZED:
        pytest.skip("resident-set sizes mean nothing under AddressSanitizer (shadow memory, quarantine)")
    case = {"id": "memory", "setup": "", "call": f"memory_scenario({4 << 20}, {32 << 20})"}
    return run_cases([case], str(tmp_path_factory.mktemp("memory")), timeout=300)["memory"]


def test_memory_measurement_sees_a_column_buffer(memory):
    """Calibration: F.unfold of the conv2d layer materialises its 205 MB of
    columns, and the measurement sees it."""
    v = _value_of(memory)
    cal = v["calibration_unfold"]
    assert cal["delta"] >= 0.9 * cal["cols_bytes"], cal


MEMORY_LAYERS = ["conv2d", "conv2d_weight", "conv_transpose2d", "conv3d", "conv3d_weight", "conv_transpose3d"]


@pytest.mark.parametrize("layer", MEMORY_LAYERS)
def test_workspace_limit_bounds_peak_memory(layer, memory):
    """With a 4 MiB limit, a layer whose columns are 205-262 MB raises the
    resident set by at most output + inputs + limit + 32 MiB."""
    if "3d" in layer and not HAS_ND:
        pytest.fail(ND_SKIP)
    v = _value_of(memory)[layer]
    assert v["close"], f"{layer}: wrong result under a small limit: {v['why']}"
    assert v["cols_bytes"] > 4 * v["bound"] or v["cols_bytes"] > v["bound"] + (128 << 20), v  # the test means something
    assert v["delta"] <= v["bound"], (
        f"{layer}: peak rose {v['delta'] / 2**20:.1f} MiB, over the bound {v['bound'] / 2**20:.1f} MiB "
        f"(output {v['out_bytes'] / 2**20:.1f} + inputs {v['in_bytes'] / 2**20:.1f} + limit 4 + slack 32); "
        f"all columns would be {v['cols_bytes'] / 2**20:.0f} MiB"
    )


# ------------------------------------------------------------------ what ships


def test_no_test_only_code_in_the_shipped_library():
    """The emulated CUDA kernels and the GPU's plan run on the CPU are a test-only extension
    (tests/emulated/): neither their symbols nor their ops are in the library users install,
    so the library has no switch that runs a CPU tensor with another device's plan."""
    import shutil

    so = convt_ext._C.__file__
    nm = shutil.which("nm")
    assert nm is not None, "binutils' nm is needed to inspect the built library"
    symbols = subprocess.run([nm, "-D", "-C", "--defined-only", so], capture_output=True, text=True, check=True).stdout
    assert "convt_ext::" in symbols or "PyInit__C" in symbols  # the listing is real
    for marker in ("emulat", "Emulat", "gpu_plan", "gpu_policy"):
        assert marker not in symbols, [line for line in symbols.splitlines() if marker in line][:5]
    ops = [name for name in dir(torch.ops.convt_ext) if not name.startswith("__")]
    assert "im2col" in ops and not any("emulat" in name or "gpu_plan" in name for name in ops), ops
    # The markers are real: the test-only extension defines them.
    from emulated_ops import emulated

    assert hasattr(emulated(), "conv_gpu_plan") and hasattr(emulated(), "gpu_policy")


def test_a_cuda_tensor_without_the_cuda_path_says_how_to_rebuild():
    """A build without the CUDA path answers a CUDA tensor with how to rebuild, from every
    public op (the dispatcher's own error would name no remedy)."""
    if convt_ext._C.cuda_compiled():
        return  # the CUDA build runs these ops; tests/test_cuda_device.py covers it
    cuda = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    x, w = torch.zeros(1, 2, 5, 5), torch.zeros(3, 2, 3, 3)
    calls = {
        "conv2d": (x, w, None, [1, 1], [0, 0], [1, 1], 1),
        "conv_transpose2d": (x, w.transpose(0, 1), None, [1, 1], [0, 0], [0, 0], 1, [1, 1]),
        "conv2d_weight": (x, torch.zeros(1, 3, 3, 3), [3, 2, 3, 3], [1, 1], [0, 0], [1, 1], 1),
        "im2col": (x, [3, 3], [1, 1], [0, 0], [1, 1]),
    }
    for name, args in calls.items():
        with pytest.raises(RuntimeError, match="built without support for CUDA tensors. Rebuild it with the CUDA toolkit"):
            getattr(torch.ops.convt_ext, name).default.redispatch(cuda, *args)
    for name in ("conv1d", "conv_transpose3d", "conv3d_weight", "col2im", "im2col.out", "_conv_transpose_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"convt_ext::{name}", "CUDA"), name
