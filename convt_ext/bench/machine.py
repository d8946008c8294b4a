"""The machine: what it is (CPU model and flags, GPU, versions) and what it
reaches at best, the ceilings every rate is compared with.

A convolution's GFLOP/s is compared with the measured fp32 peak: the best
GEMM rate among torch's engines (MKL's torch.mm and oneDNN's linear on CPU,
cuBLAS on CUDA) over a few shapes, i.e. what the FMA units reach through the
best code torch has. im2col/col2im's GB/s is compared with the copy bandwidth."""
from __future__ import annotations

import ctypes
import datetime
import os
import platform
import re
import subprocess
from contextlib import contextmanager

import torch

import convt_ext

from .measure import load_average, time_call, unfoldnd

GEMM_SHAPES = {
    "cpu": ((1024, 1024, 1024), (2048, 2048, 2048), (4096, 1024, 1024), (3136, 576, 256)),
    "cpu-quick": ((1024, 1024, 1024), (3136, 576, 256)),
    "cuda": ((4096, 4096, 4096), (8192, 8192, 8192), (16384, 2304, 512)),
    "cuda-quick": ((4096, 4096, 4096),),
}
# Between cases, every PROBE_EVERY_S seconds, the ceilings are sampled again on one shape
# (PROBE_RUN_TIME_S of blocks per engine), so that a busy moment at the start or end does
# not set them.
PROBE_SHAPES = {"cpu": (1024, 1024, 1024), "cuda": (4096, 4096, 4096)}
PROBE_EVERY_S = 10.0
PROBE_RUN_TIME_S = 0.05
CPU_FLAGS = ("avx2", "avx512f", "fma")


def gemm_engines(device):
    """{name: (what it calls, fn(a, b, b_t, c))}: the GEMMs torch has on this device.
    On CPU: torch.mm (MKL in the usual builds) and oneDNN's linear; on CUDA: cuBLAS."""
    def mm(a, b, bt, c):
        return torch.mm(a, b, out=c)

    if device.type == "cuda":
        return {"cuBLAS": ("torch.mm", mm)}
    engines = {("MKL" if torch.backends.mkl.is_available() else "BLAS"): ("torch.mm", mm)}
    if torch.backends.mkldnn.is_available():
        def onednn(a, b, bt, c):
            return torch.ops.mkldnn._linear_pointwise(a, bt, None, "none", [], "")
        engines["oneDNN"] = ('torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")', onednn)
    return engines


def reference_rates(device, quick, min_run_time, probe=False):
    """The ceilings, measured: the fp32 peak (the best GFLOP/s of every GEMM
    engine on every shape of GEMM_SHAPES: whatever the hardware's FMA units
    reach through the best code torch has) and the copy bandwidth
    (dst.copy_(src) of 64 MiB, counting the bytes read plus the bytes
    written). A ceiling is what the machine reaches at best, so each rate
    comes from the fastest timed block (at least 0.2 s of blocks each), not
    the median: on a shared machine a descheduled thread would otherwise
    lower the ceiling below what convolutions reach. Always float32, whatever
    the benchmark dtype: torch.mm in float16 runs at ~1 GFLOP/s on CPU, no peak.
    probe=True: a short sample between cases, on PROBE_SHAPES only."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    if probe:
        shapes, min_run_time = (PROBE_SHAPES[kind],), PROBE_RUN_TIME_S
    else:
        shapes, min_run_time = GEMM_SHAPES[kind + ("-quick" if quick else "")], max(min_run_time, 0.2)
    gemm = []
    for m, k, n in shapes:
        a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
        bt, c = b.t().contiguous(), torch.empty(m, n, device=device)
        for engine, (call, fn) in gemm_engines(device).items():
            entry = {"engine": engine, "call": call, "m": m, "k": k, "n": n}
            try:
                if not probe:
                    err = (fn(a, b, bt, c) - a @ b).abs().max().item() / max((a @ b).abs().max().item(), 1.0)
                    if not err < 1e-3:
                        raise RuntimeError(f"wrong product (relative error {err:.1e})")
                _, times = time_call(lambda: fn(a, b, bt, c), min_run_time)
                entry["gflops"] = 2 * m * k * n / min(times) / 1e9
            except Exception as exc:  # noqa: BLE001 - an engine this build lacks: left out of the peak
                entry["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            gemm.append(entry)
        del a, b, bt, c
    src = torch.ones(64 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    _, times = time_call(lambda: dst.copy_(src), min_run_time)
    best = max((g for g in gemm if "gflops" in g), key=lambda g: g["gflops"])
    return {
        "peak_gflops": best["gflops"], "peak_engine": best["engine"], "peak_shape": [best["m"], best["k"], best["n"]],
        "gemm": gemm, "gemm_dtype": "float32", "statistic": "fastest block",
        "copy_gbps": 2 * src.nbytes / min(times) / 1e9, "copy_bytes": src.nbytes,
        **({} if probe else fma_peak(device, 0.3 if quick else 1.0)),
    }


def fma_peak(device, seconds):
    """The CPU's float32 FMA peak, by a compiled loop of independent FMAs on
    torch's threads (convt_ext._C.fma_peak): the ceiling no GEMM passes."""
    if device.type != "cpu" or not hasattr(convt_ext._C, "fma_peak"):
        return {}
    p = convt_ext._C.fma_peak(seconds)
    return {"fma_peak_gflops": p["gflops"], "fma_isa": p["isa"]} if p["gflops"] else {}


def combine_references(start, end, probes, machine):
    """The ceilings of the run: for every engine and shape the best of its
    measurements at the start, at the end and (PROBE_SHAPES) between cases;
    the peak is their max, the copy bandwidth the max of all its measurements.
    On a shared machine the load of other processes comes and goes, and a
    ceiling taken at a busy moment would sit below what the cases reached."""
    table = {}
    for when, ref in [("start", start), ("end", end)] + [("during", p) for p in probes]:
        for g in ref["gemm"]:
            entry = table.setdefault((g["engine"], g["m"], g["k"], g["n"]), {
                "engine": g["engine"], "call": g["call"], "m": g["m"], "k": g["k"], "n": g["n"],
                "gflops": None, "start": None, "end": None, "during": None})
            if "gflops" in g:
                entry[when] = max(entry[when] or 0.0, g["gflops"])
                entry["gflops"] = max(entry["gflops"] or 0.0, g["gflops"])
            elif entry["gflops"] is None:
                entry["error"] = g.get("error")
    gemm = list(table.values())
    for g in gemm:
        if g["gflops"] is not None:
            g.pop("error", None)
    best = max((g for g in gemm if g["gflops"]), key=lambda g: g["gflops"])
    engines = {}
    for g in gemm:
        if g["gflops"] and g["gflops"] > engines.get(g["engine"], 0):
            engines[g["engine"]] = g["gflops"]
    copies = [ref["copy_gbps"] for ref in (start, end, *probes)]
    fma = [ref["fma_peak_gflops"] for ref in (start, end) if ref.get("fma_peak_gflops")]
    return {
        **({"fma_peak_gflops": max(fma), "fma_isa": start.get("fma_isa") or end.get("fma_isa")} if fma else {}),
        "peak_gflops": best["gflops"], "peak_engine": best["engine"], "peak_shape": [best["m"], best["k"], best["n"]],
        "peak_by_engine": engines, "gemm": gemm, "gemm_dtype": "float32", "statistic": "fastest block",
        "copy_gbps": max(copies), "copy_bytes": start["copy_bytes"],
        "cpu_capability": machine.get("cpu_capability"), "cpu_flags": machine.get("cpu_flags"),
        "start": start, "end": end, "probes": probes,
    }


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags():
    """{avx2, avx512f, fma: bool} and the list of avx512* flags, from /proc/cpuinfo (None elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return None
    if flags is None:
        return None
    info = {flag: flag in flags for flag in CPU_FLAGS}
    info["avx512"] = sorted(f for f in set(flags) if f.startswith("avx512"))
    return info


def describe_flags(flags):
    if not flags:
        return "CPU flags unknown"
    have = [f for f in CPU_FLAGS if flags[f]]
    lack = [f for f in CPU_FLAGS if not flags[f]]
    return " ".join(have) + (f", no {' '.join(lack)}" if lack else "")


# Note [The allocator state]
# glibc's malloc raises its mmap threshold to the size of the largest block freed so far (up
# to 32 MiB on 64-bit Linux) and its trim threshold to twice that. So the same torch call
# takes 4.5 ms or 1.9 ms depending on whether a large block was freed earlier in the process
# (fresh pages from mmap, or reused heap), and a comparison can flip with the order in which
# cases run. The bench fixes both thresholds, before it times anything, at the values the
# dynamic rule reaches in a long-running process (setting either turns the rule off), and
# records them in its JSON. It does so in its own process only: importing convt_ext changes
# nothing.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>


_allocator = None  # what set_allocator_state did, once a process


def set_allocator_state():
    """Note [The allocator state]: glibc's mmap and trim thresholds fixed for both sides of
    every comparison (once a process). Returns what was set."""
    global _allocator
    if _allocator is None:
        _allocator = _fix_thresholds()
    return _allocator


def allocator_state():
    """What set_allocator_state did in this process (machine_info records it)."""
    return _allocator or _unfixed()


def _unfixed():
    return {"allocator": platform.libc_ver()[0] or "unknown", "fixed": False,
            "ld_preload": os.environ.get("LD_PRELOAD") or None}


def _fix_thresholds():
    try:
        libc = ctypes.CDLL(None)
        version = libc.gnu_get_libc_version
        version.restype = ctypes.c_char_p
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return _unfixed()
    fixed = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return {**_unfixed(), "allocator": f"glibc {version().decode()}", "fixed": fixed,
            "mmap_threshold": MMAP_THRESHOLD, "trim_threshold": TRIM_THRESHOLD}


def format_allocator(state):
    if not state["fixed"]:
        return f"allocator: {state['allocator']}, thresholds not fixed"
    return (f"allocator: {state['allocator']}, mmap threshold {state['mmap_threshold'] >> 20} MiB, "
            f"trim threshold {state['trim_threshold'] >> 20} MiB (fixed)"
            + (f", LD_PRELOAD={state['ld_preload']}" if state["ld_preload"] else ""))


def machine_info(device):
    config = torch.__config__.show()
    onednn = re.search(r"MKL-DNN v([\w.]+)", config)
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: None)(),
        "cpu_flags": cpu_flags(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "mkl": torch.backends.mkl.is_available(),
        "mkldnn": {"available": torch.backends.mkldnn.is_available(),
                   "enabled": torch.backends.mkldnn.enabled,
                   "version": onednn.group(1) if onednn else None},
        "unfoldNd": getattr(unfoldnd(), "__version__", "installed") if unfoldnd() is not None else None,
        "convt_ext": convt_ext.build_info(),
        "load_average": load_average(),
        "allocator": allocator_state(),
    }
    if device.type == "cuda":
        info.update(
            gpu=torch.cuda.get_device_name(device),
            gpu_capability=".".join(map(str, torch.cuda.get_device_capability(device))),
            gpu_state=nvidia_smi(device.index if device.index is not None else torch.cuda.current_device()),
            cuda=torch.version.cuda,
            cudnn={"available": torch.backends.cudnn.is_available(), "version": torch.backends.cudnn.version(),
                   "benchmark": torch.backends.cudnn.benchmark},
        )
    return info


def nvidia_smi(index):
    """The GPU's driver and clocks (SM and memory, now and at most), from
    nvidia-smi; None where it cannot be run."""
    fields = ["driver_version", "clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem", "power.limit"]
    try:
        done = subprocess.run(
            ["nvidia-smi", f"--id={index}", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    values = [v.strip() for v in done.stdout.strip().split(",")]
    return dict(zip(fields, values)) if done.returncode == 0 and len(values) == len(fields) else None


@contextmanager
def tf32(on):
    """TF32 on or off for both sides on CUDA while the block runs, the caller's settings
    put back after: torch's convolutions (cuDNN) and convt_ext's GEMMs read
    torch.backends.cudnn.conv.fp32_precision (Note [TF32 as a convolution] in
    csrc/gemm.h), and torch.backends.cuda.matmul.fp32_precision is set alike, so that
    the GEMM-rate ceiling is measured under the same arithmetic. Only these per-op flags
    are set and read, as the library reads them: the legacy allow_tf32 flags throw once
    a user has set the newer API's values apart. Yields what each side then uses, read
    back from torch."""
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "tf32" if on else "ieee"
    try:
        used = conv.fp32_precision == "tf32"
        yield {"torch_cudnn": used, "convt_ext": used, "matmul_ceiling": matmul.fp32_precision == "tf32"}
    finally:
        conv.fp32_precision, matmul.fp32_precision = saved

