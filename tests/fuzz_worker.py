"""Out-of-process worker for tests/test_reliability.py and tests/test_fuzz.py.

Everything that could take the interpreter down (a SIGFPE on a huge stride, a
segfault on a wrapped index, an allocation of a wrapped size) runs here, in a
child process, so that a crash is reported as a test failure instead of ending
the test session. The parent (see `run_worker` in test_reliability.py) imports
the same convt_ext as itself by putting its package's parent folder on
PYTHONPATH and starting `python -P` from a neutral directory.

Modes:

    fuzz_worker.py cases CASES.json START
        Runs the cases of CASES.json from index START on. Each case is a dict
        {"id", "setup" (code), "call" (expression), "ref" (expression or null),
        "rtol", "atol"}; before it starts the worker prints `BEGIN <index>`,
        after it `RESULT <json>` (what the call raised or returned, how it
        compares with the reference, which of the setup's tensors it changed).
        A crash therefore leaves a BEGIN without a RESULT: the parent records
        that case as crashed and restarts the worker after it.

    fuzz_worker.py fuzz TARGETS MAX_EXAMPLES
        Runs a hypothesis loop (derandomized, no database) per fuzz target
        (comma-separated), printing `CASE <json>` before every example and
        `SUMMARY <json>` after each target.

Expected values come from torch in float64: torch.nn.functional where torch has
the op and its arguments are in a range where torch itself is exact, and
otherwise from `ref_*` below: the same relation i = o*s - p + k*d evaluated with
Python's unbounded ints, as 0/1 selection matrices contracted with torch.einsum
in float64 (exact for im2col: every sum has one non-zero term). These
references are cross-checked against F.unfold / F.fold / F.convNd in the fuzz.
"""
import ctypes
import gc
import json
import math
import os
import resource
import sys
import threading
import time

import torch
import torch.nn.functional as F
from torch.nn.grad import conv1d_weight as torch_conv1d_weight
from torch.nn.grad import conv2d_weight as torch_conv2d_weight
from torch.nn.grad import conv3d_weight as torch_conv3d_weight

import convt_ext

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
F64 = torch.float64

TORCH_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
TORCH_CONVT = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
TORCH_CONV_WEIGHT = {1: torch_conv1d_weight, 2: torch_conv2d_weight, 3: torch_conv3d_weight}

# Whether this build has the N-d API (conv1d/conv3d, ..., N-d im2col/col2im).
HAS_ND = all(hasattr(convt_ext, n) for n in ("conv1d", "conv3d", "conv_transpose1d", "conv_transpose3d", "conv1d_weight", "conv3d_weight"))


def limit_memory(gib=10):
    """Cap the address space, so that a wrapped allocation size fails with an
    exception here instead of swapping or waking the OOM killer for the whole
    machine. Not under AddressSanitizer, whose shadow memory needs the address
    space: there ASAN_OPTIONS' max_allocation_size_mb caps allocations instead
    (.ci/run)."""
    if "libasan" in os.environ.get("LD_PRELOAD", ""):
        return
    try:
        resource.setrlimit(resource.RLIMIT_AS, (gib << 30, gib << 30))
    except (ValueError, OSError):  # pragma: no cover - not permitted here
        pass


# ===================================================================== exact geometry
# Python ints: nothing here can overflow, so these say what the mathematically
# right answer is for any argument value.


def window_count(n, k, s, p, d):
    """Sliding-window positions of a size-n dimension, or 0 if none fit."""
    span = n + 2 * p - d * (k - 1) - 1
    return span // s + 1 if span >= 0 else 0


def transposed_size(n, k, s, p, op, d):
    return (n - 1) * s - 2 * p + d * (k - 1) + op + 1


class TooBig(Exception):
    """A reference too large to build here (the fuzz skips such examples)."""


def selection(n_in, n_out, k, s, p, d):
    """U[o, kk, i] = 1 where i = o*s - p + kk*d lies in [0, n_in): the 0/1
    matrix of one dimension's taps, built with exact integers."""
    if n_out * k * n_in > 4_000_000:
        raise TooBig(f"selection matrix {n_out} x {k} x {n_in}")
    u = torch.zeros(n_out, k, n_in, dtype=F64)
    for o in range(n_out):
        for kk in range(k):
            i = o * s - p + kk * d
            if 0 <= i < n_in:
                u[o, kk, i] = 1.0
    return u


_S, _K, _O = "ijk", "abd", "efg"


def ref_im2col(x, kernel, dilation, padding, stride, windows=None):
    """(N, C, *S) float64 -> (N, C*prod(k), prod(windows)), rows (c, k1, .., kD)."""
    D = len(kernel)
    S = x.shape[2:]
    if windows is None:
        windows = [window_count(S[i], kernel[i], stride[i], padding[i], dilation[i]) for i in range(D)]
    if x.shape[0] == 0:
        if math.prod(windows) > 2**40:
            raise TooBig("empty batch of a huge shape")
        return torch.zeros(0, x.shape[1] * math.prod(kernel), math.prod(windows), dtype=F64)
    us = [selection(S[i], windows[i], kernel[i], stride[i], padding[i], dilation[i]) for i in range(D)]
    spec = "nc" + _S[:D] + "," + ",".join(_O[i] + _K[i] + _S[i] for i in range(D)) + "->nc" + _K[:D] + _O[:D]
    cols = torch.einsum(spec, x.double(), *us)
    return cols.reshape(x.shape[0], x.shape[1] * math.prod(kernel), math.prod(windows))


def ref_col2im(cols, output_size, kernel, dilation, padding, stride, windows=None):
    """The adjoint: (N, C*prod(k), L) -> (N, C, *output_size)."""
    D = len(kernel)
    if windows is None:
        windows = [window_count(output_size[i], kernel[i], stride[i], padding[i], dilation[i]) for i in range(D)]
    N = cols.shape[0]
    C = cols.shape[1] // math.prod(kernel)
    if N == 0:
        if math.prod(output_size) > 2**40:
            raise TooBig("empty batch of a huge shape")
        return torch.zeros((0, C) + tuple(output_size), dtype=F64)
    us = [selection(output_size[i], windows[i], kernel[i], stride[i], padding[i], dilation[i]) for i in range(D)]
    c = cols.double().reshape((N, C) + tuple(kernel) + tuple(windows))
    spec = "nc" + _K[:D] + _O[:D] + "," + ",".join(_O[i] + _K[i] + _S[i] for i in range(D)) + "->nc" + _S[:D]
    return torch.einsum(spec, c, *us)


def ref_conv(x, w, b, stride, padding, dilation, groups, windows=None):
    D = w.dim() - 2
    kernel = list(w.shape[2:])
    N, C_in = x.shape[:2]
    C_out = w.shape[0]
    G = groups
    if windows is None:
        windows = [window_count(x.shape[2 + i], kernel[i], stride[i], padding[i], dilation[i]) for i in range(D)]
    cols = ref_im2col(x, kernel, dilation, padding, stride, windows)  # (N, C_in*K, L)
    L = cols.shape[-1]
    K = math.prod(kernel)
    y = torch.einsum(
        "gok,ngkl->ngol", w.double().reshape(G, C_out // G, C_in // G * K), cols.reshape(N, G, C_in // G * K, L)
    )
    y = y.reshape(N, C_out, L)
    if b is not None:
        y = y + b.double().reshape(1, -1, 1)
    return y.reshape((N, C_out) + tuple(windows))


def ref_conv_transpose(x, w, b, stride, padding, output_padding, groups, dilation):
    D = w.dim() - 2
    kernel = list(w.shape[2:])
    N, C_in = x.shape[:2]
    G = groups
    C_out = w.shape[1] * G
    S = list(x.shape[2:])
    image = [transposed_size(S[i], kernel[i], stride[i], padding[i], output_padding[i], dilation[i]) for i in range(D)]
    L = math.prod(S)
    K = math.prod(kernel)
    wt = w.double().reshape(G, C_in // G, C_out // G * K)
    cols = torch.einsum("gik,ngil->ngkl", wt, x.double().reshape(N, G, C_in // G, L)).reshape(N, C_out * K, L)
    y = ref_col2im(cols, image, kernel, dilation, padding, stride, windows=S)
    if b is not None:
        y = y + b.double().reshape((1, -1) + (1,) * D)
    return y


def ref_conv_weight(x, weight_size, dy, stride, padding, dilation, groups):
    D = len(weight_size) - 2
    kernel = list(weight_size[2:])
    N = x.shape[0]
    G = groups
    C_out = weight_size[0]
    windows = list(dy.shape[2:])
    cols = ref_im2col(x, kernel, dilation, padding, stride, windows)  # (N, C_in*K, L)
    L = cols.shape[-1]
    rows = cols.shape[1] // G
    gw = torch.einsum("ngol,ngkl->gok", dy.double().reshape(N, G, C_out // G, L), cols.reshape(N, G, rows, L))
    return gw.reshape(tuple(weight_size))


# ===================================================================== helpers for cases


def fwd_bwd(fn, tensors, grad):
    """fn(*tensors) and its gradients with respect to every tensor, taken on
    the CALLER's tensors themselves (made leaves that require grad), so that
    the cases can check that neither the forward nor the backward changed
    them, nor `grad`."""
    leaves = []
    for t in tensors:
        if t is not None:
            t.requires_grad_(True)
            leaves.append(t)
    y = fn(*tensors)
    grads = torch.autograd.grad(y, leaves, grad, allow_unused=True, materialize_grads=True)
    for t in leaves:
        t.requires_grad_(False)
    return [y.detach()] + [g.detach() for g in grads]


def torch_fwd_bwd(fn, tensors, grad):
    """The same with torch's op, on copies."""
    copies = [None if t is None else t.detach().clone() for t in tensors]
    return fwd_bwd(fn, copies, grad.detach().clone())


def _flatten(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        out = []
        for v in value:
            out.extend(_flatten(v))
        return out
    return None


def _describe(value):
    ts = _flatten(value)
    if ts is None:
        return {"kind": type(value).__name__}
    return {"kind": "tensors", "shapes": [list(t.shape) for t in ts], "dtypes": [str(t.dtype) for t in ts]}


def _compare(got, want, rtol, atol):
    gs, ws = _flatten(got), _flatten(want)
    if gs is None or ws is None or len(gs) != len(ws):
        return {"close": False, "why": "structure differs"}
    worst = 0.0
    for g, w in zip(gs, ws):
        if tuple(g.shape) != tuple(w.shape):
            return {"close": False, "why": f"shape {list(g.shape)} != {list(w.shape)}"}
        if g.numel() == 0:
            continue
        gd, wd = g.detach().double(), w.detach().double()
        if not bool(torch.isfinite(gd).all()):
            return {"close": False, "why": "non-finite values"}
        scale = max(1.0, wd.abs().max().item())
        err = (gd - wd).abs().max().item()
        worst = max(worst, err / scale)
        if not torch.allclose(gd, wd, rtol=rtol, atol=atol * scale):
            return {"close": False, "why": f"max |diff| {err:.3g} (scale {scale:.3g})", "err": err}
    return {"close": True, "err": worst}


def _storage_bytes(t):
    """A copy of every byte of t's storage (also those outside the view:
    nothing of the caller's may change), whatever t's shape or strides."""
    return torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage()).clone()


def _named_tensors(ns):
    out = {}
    for name, v in ns.items():
        if name.startswith("_"):
            continue
        if isinstance(v, torch.Tensor):
            out[name] = v
        elif isinstance(v, torch.nn.Module):
            for pname, p in v.state_dict(keep_vars=True).items():
                out[f"{name}.{pname}"] = p
    return out


def _tensor_snapshot(ns):
    return {
        name: (_storage_bytes(v.detach()), v.dtype, tuple(v.shape), v.stride(), v.storage_offset())
        for name, v in _named_tensors(ns).items()
    }


def _mutated(ns, snap):
    changed = []
    current = _named_tensors(ns)
    for name, (data, dtype, shape, stride, offset) in snap.items():
        v = current.get(name)
        if v is None:
            continue
        v = v.detach()
        if v.dtype != dtype or tuple(v.shape) != shape or v.stride() != stride or v.storage_offset() != offset:
            changed.append(name)
        elif not torch.equal(_storage_bytes(v), data):
            changed.append(name)
    return changed


def case_namespace():
    return {
        "torch": torch,
        "F": F,
        "convt_ext": convt_ext,
        "math": math,
        "fwd_bwd": fwd_bwd,
        "torch_fwd_bwd": torch_fwd_bwd,
        "ref_im2col": ref_im2col,
        "ref_col2im": ref_col2im,
        "ref_conv": ref_conv,
        "ref_conv_transpose": ref_conv_transpose,
        "ref_conv_weight": ref_conv_weight,
        "torch_conv1d_weight": torch_conv1d_weight,
        "torch_conv2d_weight": torch_conv2d_weight,
        "torch_conv3d_weight": torch_conv3d_weight,
        "HAS_ND": HAS_ND,
        "threads_scenario": threads_scenario,
        "memory_scenario": memory_scenario,
        "release_scenario": release_scenario,
        "flip_limit_scenario": flip_limit_scenario,
    }


def run_case(case):
    ns = case_namespace()
    torch.default_generator.manual_seed(case.get("seed", 0))
    rec = {"id": case["id"]}
    try:
        exec(case.get("setup", ""), ns)
    except Exception as exc:  # a bad case, not a library result
        rec["setup_error"] = f"{type(exc).__name__}: {exc}"
        return rec
    ref = None
    if case.get("ref"):
        try:
            ref = eval(case["ref"], ns)
            rec["ref"] = _describe(ref)
        except Exception as exc:
            rec["ref_exc"] = type(exc).__name__
            rec["ref_msg"] = str(exc)[:500]
    snap = _tensor_snapshot(ns)
    try:
        out = eval(case["call"], ns)
    except Exception as exc:
        rec["exc"] = type(exc).__name__
        rec["msg"] = str(exc)[:2000]
    else:
        rec["exc"] = None
        rec["out"] = _describe(out)
        if isinstance(out, dict):
            rec["value"] = out
        if ref is not None:
            rec["cmp"] = _compare(out, ref, case.get("rtol", 1e-10), case.get("atol", 1e-10))
    rec["mutated"] = _mutated(ns, snap)
    return rec


def main_cases(path, start):
    with open(path) as f:
        cases = json.load(f)
    for index in range(start, len(cases)):
        print(f"BEGIN {index}", flush=True)
        t0 = time.perf_counter()
        rec = run_case(cases[index])
        rec["seconds"] = round(time.perf_counter() - t0, 4)
        print("RESULT " + json.dumps(rec), flush=True)


# ===================================================================== scenarios
# Functions that the cases call by name; each returns a JSON-able dict.


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _reset_peak():
    """Return freed heap memory to the system and reset VmHWM to the current RSS
    (Linux >= 4.0: writing 5 to /proc/self/clear_refs)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # pragma: no cover - not glibc
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_delta(fn):
    """Bytes by which the process's resident set rose above its size just
    before fn(), at its highest, while fn() ran; and fn()'s result."""
    _reset_peak()
    before = _status_kib("VmRSS")
    if _status_kib("VmHWM") > before + 1024:  # the reset did not take: measure nothing
        raise RuntimeError("cannot reset VmHWM")
    out = fn()
    peak = _status_kib("VmHWM")
    return (peak - before) * 1024, out


def _nbytes(*ts):
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def memory_scenario(limit, slack):
    """Large layers whose column matrices are hundreds of MB, run with a
    workspace limit of `limit` bytes: for each, the rise of the resident set
    while it runs must stay within output + inputs + limit + slack. The first
    entry measures F.unfold of the conv2d layer (which materialises all its
    columns), to show that the measurement sees such a buffer."""
    torch.manual_seed(0)
    f32 = torch.float32
    results = {}
    release = getattr(convt_ext, "release_workspace", None)

    def layer(name, fn, ref_fn, inputs, cols_bytes):
        # Warm up (lazy initialisation, thread pools, kernels) on the same op,
        # at a small size; then free what the library keeps between calls.
        convt_ext.set_workspace_limit(limit)
        if release is not None:
            release()
        delta, out = _peak_delta(fn)
        want = ref_fn()
        cmp = _compare(out, want, 1e-4, 1e-4)
        results[name] = {
            "delta": delta,
            "out_bytes": _nbytes(out),
            "in_bytes": _nbytes(*inputs),
            "cols_bytes": cols_bytes,
            "bound": _nbytes(out) + _nbytes(*inputs) + limit + slack,
            "close": cmp["close"],
            "why": cmp.get("why"),
        }

    # Warm-up: every op once at a small size.
    xs, ws = torch.randn(2, 4, 12, 12), torch.randn(3, 4, 3, 3)
    convt_ext.conv2d(xs, ws, padding=1)
    convt_ext.conv_transpose2d(xs, ws.transpose(0, 1).contiguous(), padding=1)
    convt_ext.conv2d_weight(xs, (3, 4, 3, 3), torch.randn(2, 3, 12, 12), padding=1)
    F.unfold(xs, 3)
    F.conv2d(xs, ws)
    if HAS_ND:
        x3, w3 = torch.randn(1, 2, 6, 6, 6), torch.randn(3, 2, 3, 3, 3)
        convt_ext.conv3d(x3, w3, padding=1)
        convt_ext.conv_transpose3d(x3, w3.transpose(0, 1).contiguous(), padding=1)
        convt_ext.conv3d_weight(x3, (3, 2, 3, 3, 3), torch.randn(1, 3, 6, 6, 6), padding=1)
        convt_ext.conv1d(torch.randn(1, 4, 30), torch.randn(3, 4, 5), padding=2)

    # conv2d: 64 -> 8 channels, 7x7 kernel, 128x128: columns 3136 x 16384 floats = 205 MB.
    x = torch.randn(1, 64, 128, 128, dtype=f32)
    w = torch.randn(8, 64, 7, 7, dtype=f32) / 50
    cols = 64 * 49 * 128 * 128 * 4
    delta, u = _peak_delta(lambda: F.unfold(x, 7, padding=3))
    results["calibration_unfold"] = {"delta": delta, "cols_bytes": cols, "out_bytes": _nbytes(u)}
    del u
    layer("conv2d", lambda: convt_ext.conv2d(x, w, None, 1, 3), lambda: F.conv2d(x, w, None, 1, 3), (x, w), cols)
    # conv2d_weight of the same layer.
    dy = torch.randn(1, 8, 128, 128, dtype=f32)
    layer(
        "conv2d_weight",
        lambda: convt_ext.conv2d_weight(x, (8, 64, 7, 7), dy, 1, 3),
        lambda: torch_conv2d_weight(x, (8, 64, 7, 7), dy, 1, 3),
        (x, dy),
        cols,
    )
    # conv_transpose2d: 8 -> 64 channels, 7x7 kernel, 128x128: columns 3136 x 16384 = 205 MB.
    xt = torch.randn(1, 8, 128, 128, dtype=f32)
    wt = torch.randn(8, 64, 7, 7, dtype=f32) / 50
    layer(
        "conv_transpose2d",
        lambda: convt_ext.conv_transpose2d(xt, wt, None, 1, 3),
        lambda: F.conv_transpose2d(xt, wt, None, 1, 3),
        (xt, wt),
        cols,
    )
    del x, dy, xt
    if HAS_ND:
        # conv3d: 16 -> 4 channels, 5x5x5 kernel, 32^3: columns 2000 x 32768 floats = 262 MB.
        x3 = torch.randn(1, 16, 32, 32, 32, dtype=f32)
        w3 = torch.randn(4, 16, 5, 5, 5, dtype=f32) / 50
        cols3 = 16 * 125 * 32**3 * 4
        layer("conv3d", lambda: convt_ext.conv3d(x3, w3, None, 1, 2), lambda: F.conv3d(x3, w3, None, 1, 2), (x3, w3), cols3)
        dy3 = torch.randn(1, 4, 32, 32, 32, dtype=f32)
        layer(
            "conv3d_weight",
            lambda: convt_ext.conv3d_weight(x3, (4, 16, 5, 5, 5), dy3, 1, 2),
            lambda: torch_conv3d_weight(x3, (4, 16, 5, 5, 5), dy3, 1, 2),
            (x3, dy3),
            cols3,
        )
        xt3 = torch.randn(1, 4, 32, 32, 32, dtype=f32)
        wt3 = torch.randn(4, 16, 5, 5, 5, dtype=f32) / 50
        layer(
            "conv_transpose3d",
            lambda: convt_ext.conv_transpose3d(xt3, wt3, None, 1, 2),
            lambda: F.conv_transpose3d(xt3, wt3, None, 1, 2),
            (xt3, wt3),
            cols3,
        )
    return results


def release_scenario():
    """release_workspace(): callable repeatedly, from several threads, between
    calls of every op; results bit-identical before and after."""
    torch.manual_seed(1)
    x = torch.randn(2, 4, 40, 40, dtype=F64)
    w = torch.randn(6, 2, 3, 3, dtype=F64)
    b = torch.randn(6, dtype=F64)
    xw = torch.randn(12, 4, 6, 6, dtype=F64)
    dy = torch.randn(2, 6, 20, 20, dtype=F64)
    calls = [
        lambda: convt_ext.conv2d(x, w, b, 2, 1, 1, 2),
        lambda: convt_ext.conv2d(xw, w, b, 1, 1, 1, 2),
        lambda: convt_ext.conv_transpose2d(x, w.reshape(4, 3, 3, 3), None, 2, 1, 1, 2),
        lambda: convt_ext.conv2d_weight(x, (6, 2, 3, 3), dy, 2, 1, 1, 2),
        lambda: convt_ext.im2col(x, 3, 1, 1, 2),
    ]
    if HAS_ND:
        x3 = torch.randn(2, 2, 9, 8, 7, dtype=F64)
        w3 = torch.randn(3, 2, 3, 2, 3, dtype=F64)
        calls += [
            lambda: convt_ext.conv3d(x3, w3, None, 1, 1),
            lambda: convt_ext.conv_transpose3d(x3, w3.transpose(0, 1).contiguous(), None, 2, 1, 1),
            lambda: convt_ext.conv1d(x.flatten(2), w[:, :, 0], b, 3, 2, 1, 2),
        ]
    out = {"exists": hasattr(convt_ext, "release_workspace")}
    if not out["exists"]:
        return out
    rel = convt_ext.release_workspace
    out["returns"] = repr(rel())
    rel()
    rel()
    before = [c() for c in calls]
    for _ in range(3):
        rel()
    after = [c() for c in calls]
    out["identical_after_release"] = all(torch.equal(a, b) for a, b in zip(before, after))
    # Released between every call, and from other threads while they compute.
    errors = []

    def work(k):
        try:
            for i in range(4):
                for j, c in enumerate(calls):
                    if (i + j + k) % 2 == 0:
                        rel()
                    if not torch.equal(c(), before[j]):
                        errors.append(f"thread {k}: call {j} differs after release_workspace")
        except Exception as exc:
            errors.append(f"thread {k}: {type(exc).__name__}: {exc}")

    ts = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    out["thread_errors"] = errors[:5]
    rel()
    out["identical_at_end"] = all(torch.equal(c(), r) for c, r in zip(calls, before))
    return out


def threads_scenario(limit, iterations=4, nd=True, side=64):
    """Four Python threads call the ops at once, each on shapes that take a
    different path, with the workspace limit at `limit` bytes:
      wide        batch 16 of 8x8 images (few window positions: one wide GEMM per chunk)
      per_sample  batch 2 of 64x64 images (one task per sample)
      banded      one 96x96 sample whose columns exceed the limit (split in bands)
      inference   the per-sample and wide shapes under torch.inference_mode()
    plus forward+backward in every thread, and (N-d builds) conv1d/conv3d in
    some. Every result is compared with torch's F op in float64."""
    torch.manual_seed(2)
    convt_ext.set_workspace_limit(limit)
    r = lambda *s: torch.randn(*s, dtype=F64)  # noqa: E731

    def jobs_for(kind):
        if kind == "wide":
            x, w, b = r(16, 4, 8, 8), r(6, 2, 3, 3), r(6)
        elif kind in ("per_sample", "inference"):
            x, w, b = r(2, 4, side, side), r(6, 2, 3, 3), r(6)
        else:  # banded
            x, w, b = r(1, 8, side * 3 // 2, side * 3 // 2), r(6, 4, 3, 3), r(6)
        y_ref = F.conv2d(x, w, b, 1, 1, 1, 2)
        dy = r(*y_ref.shape)
        wt = r(x.shape[1], 3, 3, 3)
        jobs = [
            ("conv2d", lambda: convt_ext.conv2d(x, w, b, 1, 1, 1, 2), y_ref),
            ("conv2d_s2", lambda: convt_ext.conv2d(x, w, None, 2, 2, 2, 2), F.conv2d(x, w, None, 2, 2, 2, 2)),
            (
                "conv_transpose2d",
                lambda: convt_ext.conv_transpose2d(x, wt, None, 2, 1, 1, 2),
                F.conv_transpose2d(x, wt, None, 2, 1, 1, 2),
            ),
            (
                "conv2d_weight",
                lambda: convt_ext.conv2d_weight(x, tuple(w.shape), dy, 1, 1, 1, 2),
                torch_conv2d_weight(x, tuple(w.shape), dy, 1, 1, 1, 2),
            ),
            ("im2col", lambda: convt_ext.im2col(x, 3, 1, 1, 1), F.unfold(x, 3, 1, 1, 1)),
        ]
        if kind != "inference":
            fn = lambda x, w, b: convt_ext.conv2d(x, w, b, 1, 1, 1, 2)  # noqa: E731
            tfn = lambda x, w, b: F.conv2d(x, w, b, 1, 1, 1, 2)  # noqa: E731
            jobs.append(("conv2d fwd+bwd", lambda: fwd_bwd(fn, [x.clone(), w.clone(), b.clone()], dy), torch_fwd_bwd(tfn, [x, w, b], dy)))
            yt = F.conv_transpose2d(x, wt, None, 2, 1, 1, 2)
            dyt = r(*yt.shape)
            fnt = lambda x, w: convt_ext.conv_transpose2d(x, w, None, 2, 1, 1, 2)  # noqa: E731
            tfnt = lambda x, w: F.conv_transpose2d(x, w, None, 2, 1, 1, 2)  # noqa: E731
            jobs.append(
                ("conv_transpose2d fwd+bwd", lambda: fwd_bwd(fnt, [x.clone(), wt.clone()], dyt), torch_fwd_bwd(tfnt, [x, wt], dyt))
            )
        if HAS_ND and nd and kind in ("wide", "per_sample", "banded"):
            if kind == "wide":
                x3, w3 = r(16, 2, 4, 4, 4), r(3, 2, 3, 3, 3)
            elif kind == "per_sample":
                x3, w3 = r(2, 2, 16, 16, 16), r(3, 2, 3, 3, 3)
            else:
                x3, w3 = r(1, 4, 24, 24, 24), r(3, 4, 3, 3, 3)
            x1 = x.flatten(2)
            w1 = w[:, :, 1]
            jobs += [
                ("conv3d", lambda: convt_ext.conv3d(x3, w3, None, 1, 1), F.conv3d(x3, w3, None, 1, 1)),
                (
                    "conv_transpose3d",
                    lambda: convt_ext.conv_transpose3d(x3, w3.transpose(0, 1).contiguous(), None, 2, 1, 1),
                    F.conv_transpose3d(x3, w3.transpose(0, 1).contiguous(), None, 2, 1, 1),
                ),
                ("conv1d", lambda: convt_ext.conv1d(x1, w1, b, 2, 1, 1, 2), F.conv1d(x1, w1, b, 2, 1, 1, 2)),
            ]
        return jobs

    kinds = ["wide", "per_sample", "banded", "inference"]
    all_jobs = {k: jobs_for(k) for k in kinds}
    errors = []
    counts = {k: 0 for k in kinds}
    barrier = threading.Barrier(len(kinds))

    def work(kind):
        try:
            barrier.wait()
            for _ in range(iterations):
                for name, fn, want in all_jobs[kind]:
                    if kind == "inference":
                        with torch.inference_mode():
                            got = fn()
                    else:
                        got = fn()
                    cmp = _compare(got, want, 1e-10, 1e-10)
                    if not cmp["close"]:
                        errors.append(f"{kind}/{name}: {cmp.get('why')}")
                    counts[kind] += 1
        except Exception as exc:
            errors.append(f"{kind}: {type(exc).__name__}: {exc}")

    ts = [threading.Thread(target=work, args=(k,)) for k in kinds]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    # After threads in inference mode: a normal-mode call on this thread still works.
    name, fn, want = all_jobs["wide"][0]
    ok_after = _compare(fn(), want, 1e-10, 1e-10)["close"]
    return {"errors": errors[:10], "n_errors": len(errors), "counts": counts, "ok_after": ok_after}


def flip_limit_scenario(iterations=6):
    """While three threads compute, a fourth keeps changing the workspace
    limit between 1 byte and 64 MiB: results must not depend on it."""
    torch.manual_seed(3)
    r = lambda *s: torch.randn(*s, dtype=F64)  # noqa: E731
    x1, w1 = r(8, 4, 10, 10), r(6, 4, 3, 3)
    x2, w2 = r(2, 4, 48, 48), r(4, 3, 3, 3)
    x3, dy3 = r(3, 4, 20, 20), r(3, 6, 10, 10)
    jobs = [
        (lambda: convt_ext.conv2d(x1, w1, None, 1, 1), F.conv2d(x1, w1, None, 1, 1)),
        (lambda: convt_ext.conv_transpose2d(x2, w2, None, 2, 1, 1), F.conv_transpose2d(x2, w2, None, 2, 1, 1)),
        (lambda: convt_ext.conv2d_weight(x3, (6, 4, 3, 3), dy3, 2, 1), torch_conv2d_weight(x3, (6, 4, 3, 3), dy3, 2, 1)),
    ]
    stop = threading.Event()
    errors = []

    def flipper():
        i = 0
        while not stop.is_set():
            convt_ext.set_workspace_limit([1, 64 << 20, 4096, 1 << 20][i % 4])
            i += 1
            time.sleep(0.0005)

    def work(j):
        try:
            fn, want = jobs[j]
            for _ in range(iterations):
                cmp = _compare(fn(), want, 1e-10, 1e-10)
                if not cmp["close"]:
                    errors.append(f"job {j}: {cmp.get('why')}")
        except Exception as exc:
            errors.append(f"job {j}: {type(exc).__name__}: {exc}")

    f = threading.Thread(target=flipper)
    f.start()
    ts = [threading.Thread(target=work, args=(j,)) for j in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    stop.set()
    f.join()
    return {"errors": errors[:10]}


# ===================================================================== fuzz
# Each target draws an op call: geometry values mostly small, sometimes at the
# int32 / int64 limits or invalid (zero, negative); batch 0, 1, 2 or none
# (unbatched); groups, bias and sizes that may not fit. For each example:
#
#   * An exception other than ValueError / TypeError, or a crash, fails.
#   * If every value is small, torch decides: where torch raises, we must raise
#     (ValueError/TypeError); where torch returns, we must return the same
#     (float64, tight tolerance) -- except where the geometry is meaningless and
#     torch returns something anyway (MEANINGLESS below), where we must raise
#     ValueError.
#   * If any value is extreme, torch is not asked (it wraps, too: F.unfold with
#     kernel_size 2**40 returns a tensor of negative size, F.conv2d with
#     dilation 2**62 returns the input's size): exact integer arithmetic says
#     whether the geometry is valid. Invalid (or a size beyond int64) -> we
#     must raise ValueError naming one of the extreme arguments (or what it
#     feeds: output_size, the kernel of `weight`). Valid -> our result must
#     equal the exact-integer reference, or we may refuse with such a
#     ValueError (an int64 library may reject a geometry whose intermediate
#     sums do not fit).
#
# MEANINGLESS: what torch accepts although the geometry breaks its own rules.
#   torch skips its geometry checks when the batch is empty (N == 0): it returns
#   a tensor for conv_transpose with output_padding >= max(stride, dilation),
#   dilation 0 or an output size of 0, and for a weight gradient whose
#   grad_output has more windows than the input. A shape rule must not depend
#   on the batch size: we must raise ValueError (counted in
#   Stats.torch_meaningless; test_fuzz checks that every such case had N == 0).
#   (torch also convolves int64 and complex tensors; dtypes are tested in
#   test_reliability.py, where they must be a TypeError.)

EXTREMES = [2**31 - 1, 2**31, 2**32, 2**40, 2**62, 2**63 - 1]
NEGATIVE_EXTREMES = [-1, -(2**31), -(2**63)]
SMALL_LIMIT = 64  # a value above this counts as extreme: torch is not asked

GEOMETRY_NAMES = ("kernel_size", "stride", "padding", "dilation", "output_padding", "output_size", "weight_size")


class Reject(Exception):
    """The exact classification: the mathematically right answer is an error."""

    def __init__(self, names, why):
        super().__init__(why)
        self.names = set(names)


def _fits(*values):
    return all(INT64_MIN <= v <= INT64_MAX for v in values)


def exact_windows(op_names, image, kernel, stride, padding, dilation, image_name="input"):
    """Window counts for a direct window op, or Reject naming what breaks."""
    D = len(image)
    if any(v < 1 for v in image):
        raise Reject({image_name}, f"{image_name} {image} has a size below 1")
    for name, vals, lo in (("kernel_size", kernel, 1), ("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        if len(vals) != D:
            raise Reject({name}, f"{name} has {len(vals)} values for {D} dims")
        if any(v < lo for v in vals):
            raise Reject({name}, f"{name} {vals} below {lo}")
    windows = []
    for i in range(D):
        padded = image[i] + 2 * padding[i]
        reach = dilation[i] * (kernel[i] - 1) + 1
        if not _fits(padded):
            raise Reject({"padding"}, "input + 2*padding beyond int64")
        if not _fits(reach):
            raise Reject({"dilation", "kernel_size"}, "dilation*(kernel_size-1)+1 beyond int64")
        if reach > padded:
            raise Reject({"kernel_size", "dilation", "padding", image_name}, "input too small for the kernel")
        windows.append((padded - reach) // stride[i] + 1)
    return windows


def exact_transposed(image, kernel, stride, padding, output_padding, dilation):
    D = len(image)
    for name, vals, lo in (
        ("kernel_size", kernel, 1),
        ("stride", stride, 1),
        ("padding", padding, 0),
        ("output_padding", output_padding, 0),
        ("dilation", dilation, 1),
    ):
        if len(vals) != D:
            raise Reject({name}, f"{name} has {len(vals)} values for {D} dims")
        if any(v < lo for v in vals):
            raise Reject({name}, f"{name} {vals} below {lo}")
    sizes = []
    for i in range(D):
        if output_padding[i] >= max(stride[i], dilation[i]):
            raise Reject({"output_padding"}, "output_padding >= max(stride, dilation)")
        terms = [(image[i] - 1) * stride[i], 2 * padding[i], dilation[i] * (kernel[i] - 1)]
        size = transposed_size(image[i], kernel[i], stride[i], padding[i], output_padding[i], dilation[i])
        if not _fits(size):
            raise Reject({"stride", "padding", "dilation", "output_padding", "output_size", "output size"}, "output size beyond int64")
        if size < 1:
            raise Reject({"padding", "output size", "output_size"}, "output size not positive")
        if not _fits(*terms):
            # Valid in exact arithmetic, but its terms do not fit in int64: the
            # library may refuse it.
            pass
        sizes.append(size)
    return sizes


def _big(v):
    return abs(v) > SMALL_LIMIT


def _as_list(v, D):
    return [v] * D if isinstance(v, int) else list(v)


class Stats:
    def __init__(self):
        self.examples = 0
        self.valid_nonempty = 0
        self.valid_empty = 0
        self.raised = 0
        self.extreme = 0
        self.extreme_raised = 0
        self.extreme_computed = 0
        self.torch_meaningless = 0
        self.meaningless_reasons = {}
        self.meaningless_examples = {}
        self.meaningless_with_data = 0  # such cases whose input was not empty

    def as_dict(self):
        return dict(self.__dict__)


def _run(fn):
    try:
        return fn(), None
    except Exception as exc:
        return None, exc


def _check_exc_type(exc, what):
    if not isinstance(exc, (ValueError, TypeError)):
        raise AssertionError(f"{what} raised {type(exc).__name__} (not ValueError/TypeError): {exc}")


def judge(stats, ours_fn, torch_fn, exact_fn, extreme_names, tensors=(), rtol=1e-10, atol=1e-10, extension=False, label=None, also=()):
    """The oracle of one fuzz example (see the comment above EXTREMES).

    ours_fn / torch_fn: thunks; torch_fn may be None (no torch op).
    exact_fn: thunk returning the float64 reference, or raising Reject.
    extreme_names: the argument names whose values are extreme (empty: torch decides).
    tensors: the caller's tensors, checked unchanged afterwards.
    extension: the case is outside torch's API but meaningful (torch raises,
      the library may compute it, checked against the exact reference)."""
    stats.examples += 1
    snaps = [_storage_bytes(t.detach()) for t in tensors if t is not None]
    if label is not None:  # what a crash report shows
        print("CASE " + json.dumps(label, default=str), flush=True)
    try:
        exact, exact_exc = None, None
        try:
            exact = exact_fn()
        except Reject as r:
            exact_exc = r
        except TooBig:
            from hypothesis import assume

            assume(False)
        got, exc = _run(ours_fn)
        if exc is not None:
            _check_exc_type(exc, "ours")
        if extreme_names:
            stats.extreme += 1
            if exact_exc is not None:
                if exc is None:
                    raise AssertionError(f"returned {_describe(got)} for invalid geometry ({exact_exc}); must raise ValueError")
                if not isinstance(exc, ValueError):
                    raise AssertionError(f"raised {type(exc).__name__} for invalid geometry ({exact_exc}), want ValueError: {exc}")
                msg = str(exc)
                # Any argument that breaks a rule in this call may be the one named.
                accept = set(extreme_names) | exact_exc.names | _range_bad(label or {}) | set(also)
                if not accept & _names_in(msg):
                    raise AssertionError(f"ValueError does not name any of {sorted(accept)}: {msg}")
                stats.raised += 1
                stats.extreme_raised += 1
            elif exc is not None:
                if not isinstance(exc, ValueError) or not (set(extreme_names) & _names_in(str(exc))):
                    raise AssertionError(
                        f"valid extreme geometry: raised {type(exc).__name__} not naming {sorted(extreme_names)}: {exc}"
                    )
                stats.raised += 1
                stats.extreme_raised += 1
            else:
                cmp = _compare(got, exact, rtol, atol)
                if not cmp["close"]:
                    raise AssertionError(f"wrong result for valid extreme geometry: {cmp.get('why')}")
                stats.extreme_computed += 1
                _count_valid(stats, got)
            return
        want, texc = (None, None) if torch_fn is None else _run(torch_fn)
        if torch_fn is None:
            # No torch op (N-d im2col/col2im in 1-d and 3-d): the exact reference decides.
            texc = exact_exc
            want = exact
        if texc is not None:
            if exc is None:
                if extension and exact_exc is None:
                    cmp = _compare(got, exact, rtol, atol)
                    if not cmp["close"]:
                        raise AssertionError(f"extension case: wrong result: {cmp.get('why')}")
                    _count_valid(stats, got)
                    return
                raise AssertionError(f"torch raised {type(texc).__name__} ({str(texc)[:200]}) but we returned {_describe(got)}")
            stats.raised += 1
            return
        # torch returned.
        if exact_exc is not None:
            # torch accepts meaningless geometry: we must raise ValueError.
            stats.torch_meaningless += 1
            key = str(exact_exc)
            shape = (label or {}).get("input") or [None]
            if 0 not in shape:  # torch skips its checks for an empty input (batch or channels)
                stats.meaningless_with_data += 1
            if key not in stats.meaningless_reasons:
                stats.meaningless_examples[key] = json.dumps(label, default=str)
            stats.meaningless_reasons[key] = stats.meaningless_reasons.get(key, 0) + 1
            if exc is None or not isinstance(exc, ValueError):
                raise AssertionError(f"torch accepts meaningless geometry ({exact_exc}); we must raise ValueError, got {exc or _describe(got)}")
            stats.raised += 1
            return
        if exc is not None:
            raise AssertionError(f"torch returned {_describe(want)} but we raised {type(exc).__name__}: {exc}")
        cmp = _compare(got, want, rtol, atol)
        if not cmp["close"]:
            raise AssertionError(f"differs from torch: {cmp.get('why')}")
        if exact is not None:
            # Cross-check of the exact reference itself (a harness check).
            cmp2 = _compare(exact, want, 1e-9, 1e-9)
            if not cmp2["close"]:
                raise AssertionError(f"HARNESS: exact reference disagrees with torch: {cmp2.get('why')}")
        _count_valid(stats, got)
    finally:
        for t, s in zip([t for t in tensors if t is not None], snaps):
            if not torch.equal(_storage_bytes(t.detach()), s):
                raise AssertionError("the op changed one of the caller's tensors")


_MINIMUM = {"kernel_size": 1, "stride": 1, "dilation": 1, "padding": 0, "output_padding": 0, "output_size": 1, "weight_size": 1}


def _range_bad(label):
    """The geometry arguments of a call with a value below their minimum."""
    bad = set()
    for name, lo in _MINIMUM.items():
        v = label.get(name)
        if isinstance(v, str) or v is None:
            continue
        vals = [v] if isinstance(v, int) else list(v)
        if any(x < lo for x in vals):
            bad.add(name)
    return bad


def _count_valid(stats, got):
    ts = _flatten(got) or []
    if ts and all(t.numel() > 0 for t in ts):
        stats.valid_nonempty += 1
    else:
        stats.valid_empty += 1


def _names_in(msg):
    names = set()
    for n in GEOMETRY_NAMES + ("input", "weight", "bias", "grad_output", "groups", "output size", "kernel"):
        if n in msg:
            names.add(n)
    if "kernel" in msg:
        names.add("kernel_size")
    if "weight" in msg:
        names.add("kernel_size")  # a convolution's kernel is its weight's shape
    if "output size" in msg or "output_size" in msg:
        names.update({"output_size", "output size"})
    return names


def _fuzz_targets():
    from hypothesis import strategies as st

    CTX = {"kind": "small", "focus": None}

    def begin(data):
        """Per example: 'small' (every value in range, rarely one just below
        it), 'focus' (one argument, drawn here, at the int32/int64 limits, the
        rest small: a single extreme value in an otherwise valid call) or
        'wild' (any value anywhere: extreme, negative, zero)."""
        CTX["kind"] = data.draw(st.sampled_from(["small", "small", "small", "focus", "focus", "wild"]), label="mode")
        CTX["focus"] = None
        if CTX["kind"] == "focus":
            CTX["focus"] = data.draw(
                st.sampled_from(["kernel_size", "stride", "padding", "dilation", "output_padding", "output_size", "weight_size"]),
                label="focus",
            )

    def geometry(draw, name, D, lo, hi, allow_int=True):
        """One geometry argument: an int or a D-tuple (see begin)."""

        def one():
            if CTX["kind"] == "focus":
                if name == CTX["focus"] and draw(st.booleans()):
                    return draw(st.sampled_from(EXTREMES))
                return draw(st.integers(lo, hi))
            kind = draw(st.integers(0, 39))
            if CTX["kind"] == "small":
                return draw(st.integers(lo, hi)) if kind < 39 else lo - 1
            kind //= 2
            if kind < 13:
                return draw(st.integers(lo, hi))
            if kind < 18:
                return draw(st.sampled_from(EXTREMES))
            return draw(st.sampled_from(NEGATIVE_EXTREMES + [lo - 1]))

        if allow_int and draw(st.booleans()):
            v = one()
            if CTX["kind"] == "focus" and name == CTX["focus"] and not _big(v):
                v = draw(st.sampled_from(EXTREMES))
            return v
        vals = [one() for _ in range(D)]
        if CTX["kind"] == "focus" and name == CTX["focus"] and not any(_big(v) for v in vals):
            vals[draw(st.integers(0, D - 1))] = draw(st.sampled_from(EXTREMES))
        return tuple(vals)

    def extremes_of(args):
        names = []
        for name, v in args.items():
            vals = _as_list(v, 3) if isinstance(v, int) else list(v)
            if any(_big(x) for x in vals):
                names.append(name)
        return names

    def batch_of(draw):
        return draw(st.sampled_from([0, 1, 2, 2, 3, None]))

    def rand(shape):
        return torch.randn(*shape, dtype=F64)

    # ---------------------------------------------------------------- im2col
    def im2col_target(data, stats):
        begin(data)
        D = data.draw(st.sampled_from([1, 2, 2, 3] if HAS_ND else [2]), label="D")
        hi_img = 7 if D < 3 else 5
        S = [data.draw(st.integers(1, hi_img)) for _ in range(D)]
        C = data.draw(st.integers(1, 3))
        N = batch_of(data.draw)
        k = geometry(data.draw, "kernel_size", D, 1, 4)
        d = geometry(data.draw, "dilation", D, 1, 3)
        p = geometry(data.draw, "padding", D, 0, 3)
        s = geometry(data.draw, "stride", D, 1, 3)
        if D != 2:  # D comes from tuple lengths: the kernel is a D-tuple
            k = tuple(_as_list(k, D))
        x = rand(([] if N is None else [N]) + [C] + S)
        args = dict(kernel_size=k, dilation=d, padding=p, stride=s)
        ext = extremes_of(args)
        kk, dd, pp, ss = (_as_list(v, D) for v in (k, d, p, s))
        xb = x if N is not None else x.unsqueeze(0)

        def exact():
            windows = exact_windows("im2col", S, kk, ss, pp, dd)
            numel = xb.shape[0] * C * math.prod(kk) * math.prod(windows)
            if numel * 8 > INT64_MAX:
                raise Reject(set(ext) or {"kernel_size"}, "output beyond int64 bytes")
            if numel > 2_000_000:
                from hypothesis import assume

                assume(False)
            r = ref_im2col(xb, kk, dd, pp, ss, windows)
            return r if N is not None else r.squeeze(0)

        torch_fn = (lambda: F.unfold(x, k, d, p, s)) if D == 2 else None
        label = dict(op="im2col", input=list(x.shape), kernel_size=k, dilation=d, padding=p, stride=s)
        judge(stats, lambda: convt_ext.im2col(x, k, d, p, s), torch_fn, exact, ext, (x,), 0, 0, label=label)

    # ---------------------------------------------------------------- col2im
    def col2im_target(data, stats):
        begin(data)
        D = data.draw(st.sampled_from([1, 2, 2, 3] if HAS_ND else [2]), label="D")
        hi_img = 8 if D < 3 else 5
        out_size = [data.draw(st.integers(1, hi_img)) for _ in range(D)]
        if CTX["focus"] == "output_size":
            out_size[data.draw(st.integers(0, D - 1))] = data.draw(st.sampled_from(EXTREMES))
        elif CTX["kind"] != "small" and data.draw(st.integers(0, 5)) == 0:
            out_size[0] = data.draw(st.sampled_from(EXTREMES + [0, -1]))
        C = data.draw(st.integers(1, 3))
        N = batch_of(data.draw)
        k = geometry(data.draw, "kernel_size", D, 1, 4)
        d = geometry(data.draw, "dilation", D, 1, 3)
        p = geometry(data.draw, "padding", D, 0, 3)
        s = geometry(data.draw, "stride", D, 1, 3)
        if D != 2:
            k = tuple(_as_list(k, D))
        kk, dd, pp, ss = (_as_list(v, D) for v in (k, d, p, s))
        args = dict(kernel_size=k, dilation=d, padding=p, stride=s, output_size=tuple(out_size))
        ext = extremes_of(args)
        # L: right for the geometry when that is small and valid, else a guess,
        # sometimes off by one.
        try:
            windows = exact_windows("col2im", out_size, kk, ss, pp, dd, "output_size")
            L = math.prod(windows) if math.prod(windows) <= 4096 else 4
        except Reject:
            L = data.draw(st.integers(1, 6))
        if data.draw(st.integers(0, 9)) == 0:
            L += data.draw(st.sampled_from([-1, 1]))
        L = max(L, 0)
        rows = C * math.prod(kk) if all(0 < v <= 64 for v in kk) else C
        if data.draw(st.integers(0, 14)) == 0:
            rows += 1  # not a multiple of prod(kernel_size)
        cols = rand(([] if N is None else [N]) + [rows, L])
        cb = cols if N is not None else cols.unsqueeze(0)

        def exact():
            w = exact_windows("col2im", out_size, kk, ss, pp, dd, "output_size")
            if rows % math.prod(kk) != 0:
                raise Reject({"kernel_size", "input"}, "rows not a multiple of prod(kernel_size)")
            if math.prod(w) != L:
                raise Reject({"input", "output_size", "kernel_size"}, "L does not match the windows")
            numel = cb.shape[0] * (rows // math.prod(kk)) * math.prod(out_size)
            if numel * 8 > INT64_MAX:
                raise Reject({"output_size"}, "output beyond int64 bytes")
            if numel > 2_000_000:
                from hypothesis import assume

                assume(False)
            r = ref_col2im(cb, out_size, kk, dd, pp, ss, w)
            return r if N is not None else r.squeeze(0)

        osz = tuple(out_size) if D != 2 or data.draw(st.booleans()) else out_size[0] if out_size[0] == out_size[1] else tuple(out_size)
        torch_fn = (lambda: F.fold(cols, osz, k, d, p, s)) if D == 2 else None
        label = dict(op="col2im", input=list(cols.shape), output_size=osz, kernel_size=k, dilation=d, padding=p, stride=s)
        judge(stats, lambda: convt_ext.col2im(cols, osz, k, d, p, s), torch_fn, exact, ext, (cols,), 1e-12, 1e-12, label=label)

    # ---------------------------------------------------------------- conv
    def conv_shapes(data, D, transposed):
        begin(data)
        G = data.draw(st.integers(1, 3))
        cin_g = data.draw(st.integers(1, 2))
        cout_g = data.draw(st.integers(1, 2))
        # Zero-size channels (not in 'focus' mode): twist 2, no input channels (convt_ext's
        # documented empty sum); twist 3, a weight with fewer channels than groups in
        # dimension 0 (torch refuses it even where the sizes divide).
        zero = data.draw(st.integers(0, 9)) if CTX["kind"] != "focus" else -1
        if zero == 0:
            cin_g = 0
        elif zero == 1:
            cout_g = 0
        C_in, C_out = G * cin_g, G * cout_g
        kernel = [data.draw(st.integers(1, 3 if D == 3 else 4)) for _ in range(D)]
        hi_img = 8 if D < 3 else 5
        S = [data.draw(st.integers(1, hi_img)) for _ in range(D)]
        N = batch_of(data.draw)
        groups = G
        # Tensor-level errors (groups, channels, bias), but not in 'focus' mode.
        twist = data.draw(st.integers(0, 14)) if CTX["kind"] != "focus" else -1
        if twist == 0:
            groups = data.draw(st.sampled_from([0, -1, G + 1, 2**62, 2**63 - 1, -(2**63)]))  # wrong groups
        if transposed:
            wshape = [C_in, cout_g] + kernel
        else:
            wshape = [C_out, cin_g] + kernel
        if twist == 1:
            wshape[1] += 1  # channels that do not fit
        bias = data.draw(st.sampled_from([None, None, "ok", "ok", "ok", "ok"] + (["wrong"] if twist >= 0 else [])))
        x = rand(([] if N is None else [N]) + [C_in] + S)
        w = rand(wshape)
        b = None if bias is None else rand([C_out + (bias == "wrong")])
        return x, w, b, groups, N, kernel, S, C_in, C_out, G, twist

    def structural(twist, b, c_out):
        """The tensor/groups arguments that break a rule in this call."""
        names = set()
        if twist == 0:
            names |= {"groups"}
        if twist == 1:
            names |= {"weight", "input", "groups", "weight_size"}
        if b is not None and b.shape[0] != c_out:
            names |= {"bias"}
        return names

    def conv_target(D):
        def target(data, stats):
            x, w, b, groups, N, kernel, S, C_in, C_out, G, twist = conv_shapes(data, D, False)
            s = geometry(data.draw, "stride", D, 1, 3)
            d = geometry(data.draw, "dilation", D, 1, 3)
            pmode = data.draw(st.integers(0, 9))
            p = "same" if pmode == 0 else "valid" if pmode == 1 else geometry(data.draw, "padding", D, 0, 3)
            if p == "same" and data.draw(st.booleans()):
                s = 1
            args = dict(stride=s, dilation=d, padding=p if not isinstance(p, str) else 0)
            ext = extremes_of(args)
            ours = getattr(convt_ext, f"conv{D}d")
            xb = x if N is not None else x.unsqueeze(0)

            def exact():
                if twist == 0 and groups != G:
                    raise Reject({"groups"}, "groups")
                if twist == 1:
                    raise Reject({"weight", "input", "groups"}, "channels")
                if b is not None and b.shape[0] != C_out:
                    raise Reject({"bias"}, "bias size")
                ss, dd = _as_list(s, D), _as_list(d, D)
                if p == "same":
                    if any(v != 1 for v in ss):
                        raise Reject({"padding", "stride"}, "same with stride")
                    for name, vals, lo in (("dilation", dd, 1),):
                        if any(v < lo for v in vals):
                            raise Reject({name}, name)
                    totals = [dd[i] * (kernel[i] - 1) for i in range(D)]
                    if not _fits(*totals):
                        raise Reject({"dilation"}, "dilation*(k-1) beyond int64")
                    # torch: total//2 on the low side, the odd one on the high
                    # side; the output has the input's size.
                    if math.prod(S) * xb.shape[0] * C_out > 2_000_000:
                        from hypothesis import assume

                        assume(False)
                    return _finish(ref_conv(xb, w, b, [1] * D, [t // 2 for t in totals], dd, G, windows=S))
                pp = [0] * D if p == "valid" else _as_list(p, D)
                windows = exact_windows("conv", S, kernel, ss, pp, dd)
                if math.prod(windows) * xb.shape[0] * C_out > 2_000_000:
                    from hypothesis import assume

                    assume(False)
                return _finish(ref_conv(xb, w, b, ss, pp, dd, G))

            def _finish(r):
                return r if N is not None else r.squeeze(0)

            label = dict(op=f"conv{D}d", input=list(x.shape), weight=list(w.shape), bias=None if b is None else list(b.shape), stride=s, padding=p, dilation=d, groups=groups)
            judge(
                stats,
                lambda: ours(x, w, b, s, p, d, groups),
                # No input channels: torch drops the out_channels; the exact reference
                # (the empty sum, README "Degenerate shapes") decides.
                None if C_in == 0 else lambda: TORCH_CONV[D](x, w, b, s, p, d, groups),
                exact,
                ext,
                (x, w, b),
                label=label,
                also=structural(twist, b, C_out)
                | ({"padding", "stride"} if p == "same" and any(v != 1 for v in _as_list(s, D)) else set()),
            )

        return target

    def conv_transpose_target(D):
        def target(data, stats):
            x, w, b, groups, N, kernel, S, C_in, C_out, G, twist = conv_shapes(data, D, True)
            s = geometry(data.draw, "stride", D, 1, 3)
            d = geometry(data.draw, "dilation", D, 1, 3)
            p = geometry(data.draw, "padding", D, 0, 3)
            ss, dd = _as_list(s, D), _as_list(d, D)
            # output_padding: mostly valid (< max(stride, dilation)), sometimes not.
            mode = data.draw(st.integers(0, 9))
            if mode < 7 and all(0 < v <= SMALL_LIMIT for v in ss + dd):
                op = tuple(data.draw(st.integers(0, max(ss[i], dd[i]) - 1)) for i in range(D))
            else:
                op = geometry(data.draw, "output_padding", D, 0, 3)
            args = dict(stride=s, dilation=d, padding=p, output_padding=op)
            ext = extremes_of(args)
            ours = getattr(convt_ext, f"conv_transpose{D}d")
            xb = x if N is not None else x.unsqueeze(0)

            def exact():
                if twist == 0 and groups != G:
                    raise Reject({"groups"}, "groups")
                if twist == 1:
                    pass  # weight (C_in, C_out/G + 1, ...): still a valid transposed conv
                if b is not None and b.shape[0] != w.shape[1] * G:
                    raise Reject({"bias"}, "bias size")
                pp, oo = _as_list(p, D), _as_list(op, D)
                sizes = exact_transposed(S, kernel, ss, pp, oo, dd)
                if math.prod(sizes) * xb.shape[0] * w.shape[1] * G * 8 > INT64_MAX:
                    raise Reject({"stride", "padding", "dilation", "output_padding"}, "output beyond int64 bytes")
                if math.prod(sizes) * xb.shape[0] * w.shape[1] * G > 2_000_000:
                    from hypothesis import assume

                    assume(False)
                r = ref_conv_transpose(xb, w, b, ss, pp, oo, G, dd)
                return r if N is not None else r.squeeze(0)

            label = dict(op=f"conv_transpose{D}d", input=list(x.shape), weight=list(w.shape), bias=None if b is None else list(b.shape), stride=s, padding=p, output_padding=op, groups=groups, dilation=d)
            judge(
                stats,
                lambda: ours(x, w, b, s, p, op, groups, d),
                lambda: TORCH_CONVT[D](x, w, b, s, p, op, groups, d),
                exact,
                ext,
                (x, w, b),
                # torch refuses the empty weight of no input channels, and fails (IndexError) on
                # no output channels; the empty sum and the empty result are meaningful.
                extension=C_in == 0 or w.shape[1] == 0,
                label=label,
                also=structural(twist, b, w.shape[1] * G),
            )

        return target

    def conv_weight_target(D):
        def target(data, stats):
            x, w, _, groups, N, kernel, S, C_in, C_out, G, twist = conv_shapes(data, D, False)
            if N is None:
                x = x.unsqueeze(0)
                N = 1
            s = geometry(data.draw, "stride", D, 1, 3)
            d = geometry(data.draw, "dilation", D, 1, 3)
            p = geometry(data.draw, "padding", D, 0, 3)
            ss, dd, pp = _as_list(s, D), _as_list(d, D), _as_list(p, D)
            wsize = list(w.shape)
            if CTX["focus"] == "weight_size" or (CTX["kind"] == "wild" and data.draw(st.integers(0, 4)) == 0):
                wsize[data.draw(st.integers(2, D + 1))] = data.draw(st.sampled_from(EXTREMES))  # a kernel size at the limits
            args = dict(stride=s, dilation=d, padding=p, weight_size=tuple(wsize))
            ext = extremes_of(args)
            extension = False
            short = -1
            try:
                windows = exact_windows("conv_weight", S, wsize[2:], ss, pp, dd)
                windows = [min(v, 12) for v in windows]
                short = data.draw(st.integers(0, 9))
                if short == 0:
                    # grad_output short of the input's windows (the weight
                    # gradient of a transposed conv with output_padding >=
                    # stride needs it): outside torch's API, meaningful.
                    windows = [max(1, v - 1) for v in windows]
                    extension = True
                elif short == 1:
                    windows[0] += 1  # more windows than the input has: invalid
            except Reject:
                windows = [data.draw(st.integers(1, 3)) for _ in range(D)]
            dy = rand([N, wsize[0]] + windows)
            ours = getattr(convt_ext, f"conv{D}d_weight")

            def exact():
                if twist == 0 and groups != G:
                    raise Reject({"groups", "weight_size"}, "groups")
                if twist == 1:
                    raise Reject({"weight_size", "input", "groups"}, "channels")
                natural = exact_windows("conv_weight", S, wsize[2:], ss, pp, dd)
                if any(windows[i] > natural[i] for i in range(D)):
                    raise Reject({"grad_output"}, "grad_output larger than the windows")
                return ref_conv_weight(x, wsize, dy, ss, pp, dd, G)

            label = dict(op=f"conv{D}d_weight", input=list(x.shape), weight_size=wsize, grad_output=list(dy.shape), stride=s, padding=p, dilation=d, groups=groups)
            judge(
                stats,
                lambda: ours(x, tuple(wsize), dy, s, p, d, groups),
                lambda: TORCH_CONV_WEIGHT[D](x, tuple(wsize), dy, s, p, d, groups),
                exact,
                ext,
                (x, dy),
                extension=extension,
                label=label,
                also=structural(twist, None, 0) | ({"grad_output"} if short == 1 else set()),
            )

        return target

    # ---------------------------------------------------------------- nn modules
    def nn_target(data, stats):
        begin(data)
        D = data.draw(st.sampled_from([1, 2, 3] if HAS_ND else [2]), label="D")
        transposed = data.draw(st.booleans(), label="transposed")
        G = data.draw(st.integers(1, 2))
        C_in, C_out = G * data.draw(st.integers(1, 2)), G * data.draw(st.integers(1, 2))
        k = tuple(data.draw(st.integers(1, 3)) for _ in range(D))
        s = geometry(data.draw, "stride", D, 1, 3)
        d = geometry(data.draw, "dilation", D, 1, 2)
        bias = data.draw(st.booleans())
        hi_img = 8 if D < 3 else 5
        S = [data.draw(st.integers(1, hi_img)) for _ in range(D)]
        N = batch_of(data.draw)
        name = ("ConvTranspose" if transposed else "Conv") + f"{D}d"
        kwargs = dict(stride=s, dilation=d, groups=G, bias=bias)
        if transposed:
            ss, dd = _as_list(s, D), _as_list(d, D)
            kwargs["padding"] = geometry(data.draw, "padding", D, 0, 2)
            if all(0 < v <= SMALL_LIMIT for v in ss + dd) and data.draw(st.integers(0, 4)):
                kwargs["output_padding"] = tuple(data.draw(st.integers(0, max(ss[i], dd[i]) - 1)) for i in range(D))
            else:
                kwargs["output_padding"] = geometry(data.draw, "output_padding", D, 0, 2)
        else:
            pm = data.draw(st.sampled_from(["zeros", "zeros", "zeros", "reflect", "replicate", "circular"]))
            kwargs["padding_mode"] = pm
            if pm == "zeros":
                kwargs["padding"] = data.draw(st.sampled_from(["int", "int", "same", "valid"]))
                if kwargs["padding"] == "int":
                    kwargs["padding"] = geometry(data.draw, "padding", D, 0, 2)
                elif kwargs["padding"] == "same":
                    kwargs["stride"] = s = 1
            else:
                # torch pads with F.pad first (for us too: the module is torch's
                # up to the convolution): keep every value small there.
                kwargs["stride"] = s = tuple(min(max(v, 1), 3) for v in _as_list(s, D))
                kwargs["dilation"] = d = tuple(min(max(v, 1), 2) for v in _as_list(d, D))
                kwargs["padding"] = tuple(data.draw(st.integers(0, 1)) for _ in range(D))
        ext = extremes_of({k_: v for k_, v in kwargs.items() if k_ in ("stride", "dilation", "padding", "output_padding") and not isinstance(v, str)})
        tcls = getattr(torch.nn, name)
        try:
            torch.manual_seed(0)
            tmod = tcls(C_in, C_out, k, **kwargs).double()
        except Exception:
            stats.examples += 1
            stats.raised += 1  # torch's own constructor refused: nothing of ours ran
            return
        omod = getattr(convt_ext.nn, name)(C_in, C_out, k, **kwargs).double()
        omod.load_state_dict(tmod.state_dict())
        x = rand(([] if N is None else [N]) + [C_in] + S)
        xb = x if N is not None else x.unsqueeze(0)
        tb = tmod.bias.detach() if bias else None
        if not transposed and kwargs["padding_mode"] != "zeros":
            try:  # torch's F.pad (run by both modules before the convolution) must accept it
                F.pad(xb, tmod._reversed_padding_repeated_twice, mode=kwargs["padding_mode"])
            except Exception:
                from hypothesis import assume

                assume(False)

        def exact():
            ss, dd = _as_list(kwargs["stride"], D), _as_list(kwargs["dilation"], D)
            pad = kwargs["padding"]
            if transposed:
                pp, oo = _as_list(pad, D), _as_list(kwargs["output_padding"], D)
                sizes = exact_transposed(S, list(k), ss, pp, oo, dd)
                if math.prod(sizes) * xb.shape[0] * C_out * 8 > INT64_MAX:
                    raise Reject({"stride", "padding", "dilation", "output_padding"}, "too big")
                if math.prod(sizes) * xb.shape[0] * C_out > 2_000_000:
                    from hypothesis import assume

                    assume(False)
                r = ref_conv_transpose(xb, tmod.weight.detach(), tb, ss, pp, oo, G, dd)
            else:
                if pad == "same" or kwargs["padding_mode"] != "zeros":
                    # Small values only here: torch's module is the reference,
                    # except that it skips its checks for an empty batch.
                    try:
                        r = tmod(xb.clone() if xb.shape[0] else torch.zeros((1,) + xb.shape[1:], dtype=F64)).detach()
                    except RuntimeError as e:
                        raise Reject({"input", "kernel_size", "padding"}, f"torch: {e}")
                    r = r if xb.shape[0] else r[:0]
                    return r if N is not None else r.squeeze(0)
                pp = [0] * D if pad == "valid" else _as_list(pad, D)
                windows = exact_windows("conv", S, list(k), ss, pp, dd)
                if math.prod(windows) * xb.shape[0] * C_out > 2_000_000:
                    from hypothesis import assume

                    assume(False)
                r = ref_conv(xb, tmod.weight.detach(), tb, ss, pp, dd, G)
            return r if N is not None else r.squeeze(0)

        with torch.no_grad():
            label = dict(op=name, in_channels=C_in, out_channels=C_out, kernel_size=k, input=list(x.shape), **kwargs)
            judge(stats, lambda: omod(x), lambda: tmod(x), exact, ext, (x,), label=label)

    targets = {"im2col": im2col_target, "col2im": col2im_target, "nn": nn_target}
    for D in (1, 2, 3):
        targets[f"conv{D}d"] = conv_target(D)
        targets[f"conv_transpose{D}d"] = conv_transpose_target(D)
        targets[f"conv{D}d_weight"] = conv_weight_target(D)
    return targets


def _format_failure(exc):
    parts = []
    for e in getattr(exc, "exceptions", None) or [exc]:
        notes = "\n".join(getattr(e, "__notes__", []) or [])
        parts.append(f"{type(e).__name__}: {e}\n{notes}")
    return "\n---\n".join(parts)


ND_TARGETS = {"conv1d", "conv3d", "conv_transpose1d", "conv_transpose3d", "conv1d_weight", "conv3d_weight"}


def main_fuzz(names, max_examples):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    targets = _fuzz_targets()
    for name in names:
        if name in ND_TARGETS and not HAS_ND:
            print("SUMMARY " + json.dumps({"target": name, "missing": True}), flush=True)
            continue
        stats = Stats()
        body = targets[name]
        failure = None
        t0 = time.time()

        @settings(
            max_examples=max_examples,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
            print_blob=False,
            report_multiple_bugs=False,
        )
        @given(st.data())
        def run(data):
            body(data, stats)

        try:
            run()
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            failure = _format_failure(exc)[:6000]
        summary = {"target": name, "stats": stats.as_dict(), "failure": failure, "seconds": round(time.time() - t0, 2)}
        print("SUMMARY " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    import os
    import warnings

    expected = os.environ.get("CONVT_EXT_TEST_FILE")
    if expected and os.path.abspath(convt_ext.__file__) != expected:
        raise SystemExit(f"the worker imported {convt_ext.__file__}, the tests {expected}")
    warnings.filterwarnings("ignore")
    limit_memory()
    mode = sys.argv[1]
    if mode == "cases":
        main_cases(sys.argv[2], int(sys.argv[3]))
    elif mode == "fuzz":
        main_fuzz(sys.argv[2].split(","), int(sys.argv[3]))
    else:
        raise SystemExit(f"unknown mode {mode}")
