"""Build convt_ext: a C++ extension, plus the CUDA path when it can be built.

    pip install --no-build-isolation .            # C++ always; CUDA if torch has it and nvcc is found
    FORCE_CUDA=1 CUDA_HOME=/usr/local/cuda-13.0 pip install --no-build-isolation .
    CONVT_EXT_SANITIZE=1 pip install --no-build-isolation .   # ASan + UBSan, for tests

--no-build-isolation matters: an isolated build would compile against a
freshly downloaded torch, not the one that will import the extension.
"""
import glob
import os
import re
import subprocess
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - the message is the point
    sys.exit(
        "convt_ext: torch must be installed before building. Install torch first, then run\n"
        "    pip install --no-build-isolation .\n"
        "(without --no-build-isolation, pip builds against a different torch in a throwaway env)."
    )

ROOT = os.path.dirname(os.path.abspath(__file__))


def fail(message):
    sys.exit(f"convt_ext build error: {message}")


def nvcc_release(cuda_home):
    """The toolkit's release ("13.0"), from `nvcc --version`."""
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        fail(f"could not run {nvcc} --version ({exc}).")
    match = re.search(r"release (\d+)\.(\d+)", out)
    if not match:
        fail(f"could not read the CUDA release from `{nvcc} --version`:\n{out}")
    return f"{match.group(1)}.{match.group(2)}"


def want_cuda():
    """Decide whether to build the CUDA path, and explain why not when forced."""
    forced = os.environ.get("FORCE_CUDA", "0") == "1"
    if torch.version.cuda is None:
        if forced:
            fail(
                f"FORCE_CUDA=1, but the installed torch {torch.__version__} is a CPU-only build. "
                "Install a CUDA build of torch first."
            )
        return False
    cuda_home = cpp_extension.CUDA_HOME
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    if not nvcc or not os.path.exists(nvcc):
        if forced:
            fail(
                "FORCE_CUDA=1, but nvcc was not found"
                + (f" at {nvcc}" if nvcc else "")
                + ". Set CUDA_HOME to the CUDA toolkit's own folder (the one holding bin/nvcc "
                "and lib64/), e.g. CUDA_HOME=/usr/local/cuda-13.0."
            )
        return False
    if not glob.glob(os.path.join(cuda_home, "lib64", "libcudart.so*")) and not glob.glob(
        os.path.join(cuda_home, "lib", "libcudart.so*")
    ):
        msg = (
            f"CUDA_HOME={cuda_home} has bin/nvcc but no lib64/libcudart.so: it is probably a "
            "wrapper folder, not the toolkit. Set CUDA_HOME to the toolkit's own folder, "
            "e.g. CUDA_HOME=/usr/local/cuda-13.0."
        )
        if forced:
            fail(msg)
        print(f"convt_ext: building without CUDA: {msg}", file=sys.stderr)
        return False
    release = nvcc_release(cuda_home)
    if release.split(".")[0] != torch.version.cuda.split(".")[0]:
        fail(
            f"nvcc in {cuda_home} is CUDA {release}, but torch {torch.__version__} was built "
            f"with CUDA {torch.version.cuda}. Point CUDA_HOME at a CUDA {torch.version.cuda} "
            "toolkit, or install a torch built for CUDA " + release + "."
        )
    return True


def default_archs(cuda_home):
    """Every architecture that both the installed torch and this toolkit's nvcc
    support, as SASS, plus PTX of the newest, which later GPUs JIT-compile:
    e.g. "7.5;8.0;8.6;9.0;10.0;12.0+PTX" for torch 2.14 and CUDA 13."""
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    try:
        listed = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        fail(f"could not run {nvcc} --list-gpu-arch ({exc}); set TORCH_CUDA_ARCH_LIST.")
    toolkit = {int(m) for m in re.findall(r"compute_(\d+)", listed)}
    torch_archs = {int(m) for a in torch.cuda.get_arch_list() for m in re.findall(r"sm_(\d+)", a)}
    common = sorted(toolkit & torch_archs) or sorted(toolkit)[-1:]
    if not common:
        fail(f"{nvcc} lists no GPU architectures; set TORCH_CUDA_ARCH_LIST.")
    names = [f"{a // 10}.{a % 10}" for a in common]
    names[-1] += "+PTX"
    return ";".join(names)


def cublas_paths(cuda_home):
    """cuBLAS's headers and library for csrc/cuda/gemm_cublas.cu: the toolkit's
    own, or those of the nvidia-cublas wheel that a CUDA build of torch
    installs (site-packages/nvidia/cu*/), when the toolkit has no cuBLAS."""
    site = os.path.dirname(os.path.dirname(torch.__file__))
    roots = [cuda_home] + sorted(glob.glob(os.path.join(site, "nvidia", "cu*")), reverse=True) + [
        os.path.join(site, "nvidia", "cublas")
    ]
    for root in roots:
        header = os.path.join(root, "include", "cublas_v2.h")
        libs = sorted(glob.glob(os.path.join(root, "lib64", "libcublas.so*")) + glob.glob(os.path.join(root, "lib", "libcublas.so*")))
        if os.path.exists(header) and libs:
            # The versioned file (libcublas.so.13): the wheel has no unversioned link.
            lib = min(libs, key=len)
            return os.path.join(root, "include"), [lib, "-Wl,-rpath," + os.path.dirname(lib)]
    fail(
        "the CUDA path needs cuBLAS (cublas_v2.h and libcublas.so), found neither in "
        f"CUDA_HOME={cuda_home} nor in {os.path.join(site, 'nvidia')}; install the toolkit's cuBLAS, "
        "or a CUDA build of torch, which brings it."
    )


def version():
    with open(os.path.join(ROOT, "convt_ext", "_version.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


SANITIZE = os.environ.get("CONVT_EXT_SANITIZE", "0") == "1"


def write_build_config(cuda, archs, cuda_release):
    """Record how this build was made, for convt_ext.build_info()."""
    path = os.path.join(ROOT, "convt_ext", "_build_config.py")
    with open(path, "w") as f:
        f.write("# Written by setup.py at build time; not under version control.\n")
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        f.write(f"CUDA = {cuda!r}\n")
        f.write(f"CUDA_VERSION = {cuda_release!r}\n")
        f.write(f"CUDA_ARCHS = {archs!r}\n")
        f.write(f"SANITIZE = {SANITIZE!r}\n")


def extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")) + glob.glob(os.path.join("csrc", "conv", "*.cpp")))
    cxx = ["-O3", "-fopenmp"]
    link = ["-fopenmp"]
    if SANITIZE:
        # AddressSanitizer + UndefinedBehaviorSanitizer, for the tests (README:
        # "Sanitizer build"). Every UB report aborts, so a test run cannot pass over one.
        # -g1: line tables, all a report's stack trace needs, in less build time than -g.
        sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g1"]
        cxx = ["-O1", "-fopenmp"] + sanitize
        link += sanitize
    if want_cuda():
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = default_archs(cpp_extension.CUDA_HOME)
        archs = [a for a in re.split(r"[;\s]+", os.environ["TORCH_CUDA_ARCH_LIST"]) if a]
        write_build_config(True, archs, nvcc_release(cpp_extension.CUDA_HOME))
        cublas_include, cublas_link = cublas_paths(cpp_extension.CUDA_HOME)
        return cpp_extension.CUDAExtension(
            "convt_ext._C",
            sources + sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu"))),
            include_dirs=[cublas_include],
            # CONVT_EXT_CUDA: the GEMM engine's CUDA engine is compiled in (csrc/cuda/gemm_cublas.h).
            extra_compile_args={"cxx": cxx + ["-DCONVT_EXT_CUDA"], "nvcc": ["-O3", "-DCONVT_EXT_CUDA"]},
            extra_link_args=link + cublas_link,
        )
    write_build_config(False, [], None)
    return cpp_extension.CppExtension(
        "convt_ext._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link
    )


setup(
    name="convt_ext",
    version=version(),
    description="im2col/col2im, conv2d and conv_transpose2d as each other's adjoints, in C++/CUDA for PyTorch",
    packages=find_packages(include=["convt_ext", "convt_ext.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.9",
    install_requires=["torch"],
    extras_require={"bench": ["tqdm", "matplotlib"], "test": ["pytest", "expecttest"]},
)
