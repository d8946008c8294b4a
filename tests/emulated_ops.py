"""The test-only extension that runs device code on the CPU, built on first
use and loaded into this process (torch.ops.convt_ext_emulated):
  - tests/emulated/emulate.cpp: the CUDA kernels' per-element code, .im2col
    and .col2im;
  - tests/emulated/gpu_plan.cpp: the convolutions with a GPU's plan,
    .conv_gpu_plan and its kin, which call the built library's own code
    (convt_ext._C, linked by its path).
It is never part of the installed library (tests/test_reliability.py checks
the shipped .so)."""
import functools
import os

import torch
from torch.utils import cpp_extension

import convt_ext  # noqa: F401  (registers convt_ext::im2col and ::col2im, which the emulated ops call)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.cache
def emulated():
    library = os.path.abspath(convt_ext._C.__file__)
    cpp_extension.load(
        name="convt_ext_emulated",
        sources=[os.path.join(ROOT, "tests", "emulated", name) for name in ("emulate.cpp", "gpu_plan.cpp")],
        extra_include_paths=[os.path.join(ROOT, "csrc")],
        extra_cflags=["-O2", "-fopenmp"],
        # The library this process loaded already: the loader finds it loaded
        # and binds gpu_plan.cpp's calls to its code.
        extra_ldflags=["-fopenmp", library, f"-Wl,-rpath,{os.path.dirname(library)}"],
        is_python_module=False,
        verbose=False,
    )
    return torch.ops.convt_ext_emulated
