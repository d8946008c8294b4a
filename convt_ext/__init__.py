"""convt_ext: im2col/col2im, conv2d and conv_transpose2d as each other's
adjoints, in C++/CUDA for PyTorch.

    import convt_ext
    y = convt_ext.conv_transpose2d(x, w, stride=2, padding=1, output_padding=1)

The ops are also registered with the dispatcher as torch.ops.convt_ext.*.
"""
import os

import torch

from ._version import __version__
from . import _C
from . import _autograd, _fake, _vmap  # noqa: F401  (each registers its Python kernels of the ops, once)
from .functional import (
    col2im,
    conv1d,
    conv1d_weight,
    conv2d,
    conv2d_weight,
    conv3d,
    conv3d_weight,
    conv_transpose1d,
    conv_transpose2d,
    conv_transpose3d,
    im2col,
    im2col_view,
)
from .matrix import (
    EquivalentConv,
    EquivalentConv1d,
    EquivalentConv2d,
    EquivalentConv3d,
    conv_matrix,
    conv_transpose1d_as_conv1d,
    conv_transpose2d_as_conv2d,
    conv_transpose3d_as_conv3d,
    equivalent_conv1d,
    equivalent_conv2d,
    equivalent_conv3d,
    im2col_matrix,
    output_padding_for,
)
from . import nn

__all__ = [
    "__version__",
    "build_info",
    "col2im",
    "conv1d",
    "conv1d_weight",
    "conv2d",
    "conv2d_weight",
    "conv3d",
    "conv3d_weight",
    "conv_path",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "engine_info",
    "gemm_engine",
    "im2col",
    "im2col_view",
    "release_workspace",
    "set_conv_path",
    "set_gemm_engine",
    "set_workspace_limit",
    "workspace_limit",
    "EquivalentConv",
    "EquivalentConv1d",
    "EquivalentConv2d",
    "EquivalentConv3d",
    "conv_matrix",
    "conv_transpose1d_as_conv1d",
    "conv_transpose2d_as_conv2d",
    "conv_transpose3d_as_conv3d",
    "equivalent_conv1d",
    "equivalent_conv2d",
    "equivalent_conv3d",
    "im2col_matrix",
    "output_padding_for",
]

WORKSPACE_ENV = "CONVT_EXT_WORKSPACE_LIMIT"
GEMM_ENGINE_ENV = "CONVT_EXT_GEMM_ENGINE"
GEMM_ENGINES = ("auto", "benchmark", "aten", "onednn", "brgemm")
CONV_PATH_ENV = "CONVT_EXT_CONV_PATH"
CONV_PATHS = ("auto", "benchmark", "view", "columns", "depthwise")


def set_gemm_engine(engine):
    """Choose how the convolutions multiply (Note [The GEMM engine] in
    csrc/gemm.h; also the CONVT_EXT_GEMM_ENGINE environment variable):

    - "auto" (default): a fixed rule, oneDNN for float32 on non-Intel CPUs
      with AVX-512 (where MKL runs its AVX2 code), for single GEMMs of at
      least 2^20 multiply-adds (oneDNN costs a boxed call per group, which
      grouped and tiny GEMMs do not repay), at::mm (MKL, cuBLAS)
      everywhere else;
    - "benchmark": time every engine on each GEMM shape at its first use and
      keep the fastest, like torch.backends.cudnn.benchmark (results may then
      differ between processes in the last bits; acts as "auto" under
      torch.use_deterministic_algorithms(True));
    - "aten", "onednn" or "brgemm": that engine, wherever it can run the
      GEMM (at::mm otherwise).

    Results agree with torch to rounding whatever the engine."""
    if not isinstance(engine, str):
        raise TypeError(f"set_gemm_engine: engine must be a str, but got {engine!r}")
    _C.set_gemm_engine(engine)


def gemm_engine():
    """The current GEMM engine setting (see set_gemm_engine)."""
    return _C.gemm_engine()


def set_conv_path(path):
    """Choose how the CPU convolutions feed their GEMMs (Note [im2col as a
    view] in csrc/conv/view.h; also the CONVT_EXT_CONV_PATH environment
    variable):

    - "auto" (default): the depthwise path where its rule says it wins,
      then the view path where its rule does, the column path elsewhere.
      The depthwise rule: on the CPU, where the depthwise loops run their
      AVX-512 build (engine_info()["path"]["depthwise_isa"]), up to 16
      channels per group on both sides, but not 16 on both in channels_last
      memory (the view wins there); one on both sides elsewhere; on a GPU, conv and conv_transpose with one channel per
      group on the side they sum over. The view rule
      (benchmarks/NOTES.md items 25 and 27): float32, at least 16 channels
      per group on both sides, not 1x1; then, on a CPU with AVX-512, always;
      with AVX2 where the view saves a copy: an input already channels_last,
      or overlapping windows in 2-d or 3-d (conv and its weight gradient in
      2-d only while a tap is at most 128 x 256 channels);
    - "view": per-tap GEMMs on strided views of channels-last memory, no
      column matrix, wherever it can run (float32 on a CPU where oneDNN's
      ukernel runs, IEEE float32 convolutions, within the workspace limit);
    - "depthwise": a direct sum over taps per output element, no GEMM
      (Note [Depthwise as a diagonal] in csrc/depthwise_elements.h),
      wherever it can run: every floating dtype, CPU and CUDA, at most 16
      channels per group on the side a sum runs over (both sides for the
      weight gradient);
    - "columns": im2col/col2im and GEMMs, always;
    - "benchmark": time every path that can run a call on its first use of
      its geometry and keep the fastest, like torch.backends.cudnn.benchmark
      (engine_info()["path"]["benchmarked"] lists the choices, seconds per
      path; acts as "auto" under torch.use_deterministic_algorithms(True)).

    A named path runs where it can, the column path elsewhere.
    Results agree with torch to rounding whatever the path."""
    if not isinstance(path, str):
        raise TypeError(f"set_conv_path: path must be a str, but got {path!r}")
    _C.set_conv_path(path)


def conv_path():
    """The current convolution path setting (see set_conv_path)."""
    return _C.conv_path()


def engine_info():
    """What the GEMM engine layer does here: the setting, the engines this
    build and CPU can run, the rule's inputs (AVX-512 where torch's kernels use it,
    which ATEN_CPU_CAPABILITY can cap; the CPU vendor) and its
    choice per CPU dtype for one large GEMM (grouped and tiny GEMMs run on
    aten), what "benchmark" mode timed and chose per GEMM
    shape (seconds per engine), and how many GEMM calls each engine ran.

    Also: "thread_independent" (per engine, whether its CPU results are
    bitwise the same for any torch.set_num_threads()), "thread_dependent_calls"
    (CPU GEMMs that ran where they may not be), "pinned_calls" (BLAS calls
    run with MKL's thread count pinned to one on the calling thread),
    "cpu_native_bf16", "fp32_in_bf16" and "bf16_calls" (whether float32
    convolutions follow torch.backends.mkldnn.conv.fp32_precision = "bf16"
    here, and how many GEMMs did), "cpu_packs_bf16" (whether oneDNN's
    ukernel has a bfloat16 pack here, cpublas::could_pack: AMX CPUs alone;
    the bench judges its bf16 goals only there), and "cores" (the cores this process may
    use, after its affinity mask and cgroup quota: the most tasks a call runs
    at once), and "path": the convolution path setting (set_conv_path),
    whether the view path can run here, which build of the depthwise path's
    vector loops runs ("avx512", "avx2" or "default", after
    ATEN_CPU_CAPABILITY), and how many CPU convolution calls each path ran
    (one per op call)."""
    info = _C.engine_report()
    info["cores"] = _C.usable_cores()
    info["path"] = _C.path_report()
    return info


def set_workspace_limit(bytes):
    """Cap all the column buffers of one convolution call, over every thread,
    at `bytes` (default 1 GiB, or the CONVT_EXT_WORKSPACE_LIMIT environment
    variable). Larger work is split into blocks of window positions; results
    do not depend on the limit. The only excess: one position of the last
    spatial dimension, when even that is larger than the limit."""
    if isinstance(bytes, bool) or not isinstance(bytes, int):
        raise TypeError(f"set_workspace_limit: bytes must be an int, but got {bytes!r}")
    _C.set_workspace_limit(bytes)


def release_workspace():
    """Free the column buffers that threads keep between calls (on the CPU,
    each thread keeps up to its share of the workspace limit, so that the
    next call need not fault in fresh pages). Safe at any time: a call in
    flight keeps the buffer it holds."""
    _C.release_workspace()


def workspace_limit():
    """The current column-buffer cap in bytes."""
    return _C.workspace_limit()


def build_info():
    """How this build was made: whether the CUDA path was compiled, for which
    architectures, and against which torch and CUDA versions."""
    try:
        from . import _build_config as cfg
    except ImportError:  # built by some other route than setup.py
        cfg = None
    archs = list(getattr(cfg, "CUDA_ARCHS", []))
    return {
        "version": __version__,
        "cuda": _C.cuda_compiled(),
        "cuda_archs": archs,
        # The GPU code in the build: machine code (SASS) per architecture, and
        # PTX, which the driver compiles for GPUs newer than every SASS target.
        "cuda_sass": [_sm(a) for a in archs],
        "cuda_ptx": [_sm(a).replace("sm_", "compute_") for a in archs if a.endswith("+PTX")],
        "cuda_version": getattr(cfg, "CUDA_VERSION", None),
        "built_with_torch": getattr(cfg, "TORCH_VERSION", None),
        "sanitize": getattr(cfg, "SANITIZE", False),
        "torch": torch.__version__,
        "workspace_limit": workspace_limit(),
        "gemm_engine": gemm_engine(),
        "conv_path": conv_path(),
    }


def _sm(arch):
    """'8.6' or '12.0+PTX' -> 'sm_86' / 'sm_120'."""
    major, minor = arch.replace("+PTX", "").split(".")
    return f"sm_{major}{minor}"


def _workspace_from_env():
    value = os.environ.get(WORKSPACE_ENV)
    if value is None:
        return
    try:
        set_workspace_limit(int(value))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{WORKSPACE_ENV} must be a positive number of bytes, but got {value!r}") from exc


def _setting_from_env(variable, choices, apply):
    value = os.environ.get(variable)
    if not value:
        return
    if value not in choices:
        raise ValueError(f"{variable} must be one of {', '.join(choices)}, but got {value!r}")
    apply(value)


_workspace_from_env()
_setting_from_env(GEMM_ENGINE_ENV, GEMM_ENGINES, set_gemm_engine)
_setting_from_env(CONV_PATH_ENV, CONV_PATHS, set_conv_path)
_C.check_environment()  # the tuning variables (README): a malformed one fails at import
