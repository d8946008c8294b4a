"""The test-only extension that runs the CUDA kernels' per-element code on the
CPU (tests/emulated/emulate.cpp), built on first use and loaded into this
process: torch.ops.convt_ext_emulated.im2col / .col2im. It is never part of
the installed library (tests/test_reliability.py checks the shipped .so)."""
import functools
import os

import torch
from torch.utils import cpp_extension

import convt_ext  # noqa: F401  (registers convt_ext::im2col and ::col2im, which the emulated ops call)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.cache
def emulated():
    cpp_extension.load(
        name="convt_ext_emulated",
        sources=[os.path.join(ROOT, "tests", "emulated", "emulate.cpp")],
        extra_include_paths=[os.path.join(ROOT, "csrc")],
        extra_cflags=["-O2", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )
    return torch.ops.convt_ext_emulated
