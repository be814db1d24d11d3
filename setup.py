"""Build of dsrna and its native extension ``dsrna._C``.

Install for development with ``pip install --no-build-isolation -e .`` (torch, ninja, pybind11,
setuptools and wheel already in the environment; see requirements.txt), or build the extension in
place with ``python setup.py build_ext --inplace``.

* C++ CPU kernels are always built. CUDA kernels are added when a CUDA toolkit resolves from the
  ``nvcc`` on PATH (or ``CUDA_HOME``); ``TORCH_CUDA_ARCH_LIST`` defaults to ``9.0`` (H100/H200)
  when no GPU is visible at build time.
* ``DSRNA_NO_CUDA=1`` skips the CUDA kernels; ``DSRNA_NO_EXT=1`` skips the extension entirely
  (pure-Python install: the reference and Triton paths still work).
"""

import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() not in ("", "0", "false", "no")


def _cuda_root_from_nvcc() -> str | None:
    """The real toolkit root. The ``nvcc`` on PATH may be a wrapper script, so ask nvcc itself where
    it runs from (``#$ _HERE_=<root>/bin`` in its dry run) instead of following PATH."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        dry_run = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                                 capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (dry_run.stdout + dry_run.stderr).splitlines():
        if line.startswith("#$ _HERE_="):
            return os.path.dirname(line.split("=", 1)[1].strip().rstrip("/"))
    return None


def _extensions():
    if _flag("DSRNA_NO_EXT"):
        return [], {}
    use_cuda = not _flag("DSRNA_NO_CUDA")
    if use_cuda:
        # torch.utils.cpp_extension fixes CUDA_HOME when it is imported: resolve it first.
        cuda_home = os.environ.get("CUDA_HOME") or _cuda_root_from_nvcc()
        use_cuda = cuda_home is not None and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))
        if use_cuda:
            os.environ["CUDA_HOME"] = cuda_home

    import torch
    if use_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"  # no GPU to ask: build for H100/H200
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    # Only csrc/ops.cpp includes torch headers (the slow part of the build); the kernels are plain
    # C++ headers it instantiates and .cu files with plain CUDA.
    sources = [os.path.join(CSRC, "ops.cpp")]
    # The CPU kernels split their work with at::parallel_for, whose OpenMP backend (that of PyTorch's
    # Linux wheels) runs the whole range on the calling thread unless the caller is compiled with
    # OpenMP; the extension then shares the libgomp that torch has loaded (dsrna._C.built_with_openmp).
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    compile_args = {"cxx": ["-O3", *openmp]}
    link_args = openmp
    if use_cuda:
        sources += [os.path.join(CSRC, "cuda", name) for name in ("weighted_sum.cu", "depthwise.cu")]
        compile_args["nvcc"] = ["-O3", "-std=c++17"]
        ext = CUDAExtension("dsrna._C", sources, extra_compile_args=compile_args, extra_link_args=link_args,
                            define_macros=[("DSRNA_WITH_CUDA", None)])
    else:
        ext = CppExtension("dsrna._C", sources, extra_compile_args=compile_args, extra_link_args=link_args)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

# The Triton kernels live in the top-level folder kernels/ but install as dsrna.kernels
# (a top-level module named `kernels` belongs to another package).
setup(
    packages=find_packages(include=["dsrna", "dsrna.*"]) + ["dsrna.kernels"],
    package_dir={"dsrna": "dsrna", "dsrna.kernels": "kernels"},
    package_data={"dsrna.data": ["*.npz"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
