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
from . import _ops  # noqa: F401  (registers fake kernels and autograd)
from .functional import col2im, conv2d, conv2d_weight, conv_transpose2d, im2col
from .matrix import EquivalentConv2d, conv_matrix, conv_transpose2d_as_conv2d, equivalent_conv2d, im2col_matrix, output_padding_for
from . import nn

__all__ = [
    "__version__",
    "build_info",
    "col2im",
    "conv2d",
    "conv2d_weight",
    "conv_transpose2d",
    "im2col",
    "set_workspace_limit",
    "workspace_limit",
    "EquivalentConv2d",
    "conv_matrix",
    "conv_transpose2d_as_conv2d",
    "equivalent_conv2d",
    "im2col_matrix",
    "output_padding_for",
]

WORKSPACE_ENV = "CONVT_EXT_WORKSPACE_LIMIT"


def set_workspace_limit(bytes):
    """Cap the column buffer of one conv2d / conv_transpose2d call at `bytes`
    (default 1 GiB, or the CONVT_EXT_WORKSPACE_LIMIT environment variable).
    Larger batches are processed in chunks of whole samples; results do not
    depend on the limit. A single sample may exceed it."""
    if isinstance(bytes, bool) or not isinstance(bytes, int):
        raise TypeError(f"set_workspace_limit: bytes must be an int, but got {bytes!r}")
    _C.set_workspace_limit(bytes)


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
    return {
        "version": __version__,
        "cuda": _C.cuda_compiled(),
        "cuda_archs": list(getattr(cfg, "CUDA_ARCHS", [])),
        "cuda_version": getattr(cfg, "CUDA_VERSION", None),
        "built_with_torch": getattr(cfg, "TORCH_VERSION", None),
        "torch": torch.__version__,
        "workspace_limit": workspace_limit(),
    }


def _workspace_from_env():
    value = os.environ.get(WORKSPACE_ENV)
    if value is None:
        return
    try:
        set_workspace_limit(int(value))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{WORKSPACE_ENV} must be a positive number of bytes, but got {value!r}") from exc


_workspace_from_env()
