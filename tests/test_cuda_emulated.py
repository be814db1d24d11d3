"""The CUDA kernels of csrc/cuda run on the CPU by an emulator of the CUDA thread model
(tests/cuda_emulator/emulate.h): every kernel through its host launcher against plain loops, in every
dtype it takes, on shapes that span several tiles, many planes per block and one-row images
(tests/cuda_emulator/check_kernels.cc). It checks the indexing, tiling and barriers of kernels that
otherwise only compile here; speed, launch limits and the memory model need a GPU
(benchmarks/gpu_check.sh runs the GPU tests)."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EMULATOR = Path(__file__).with_name("cuda_emulator")
KERNEL_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


def for_emulator(source: str) -> str:
    """A .cu file as C++ for the emulator: kernel launches call ``emu::launch``, the dynamic shared
    memory is the emulator's buffer, static ``__shared__`` arrays are function statics (one block runs
    at a time)."""
    source, dynamic = re.subn(r"extern __shared__ __align__\(\d+\) unsigned char (\w+)\[\];",
                              r"unsigned char* \1 = emu::shared_memory;", source)
    source = source.replace("__shared__ ", "static ")
    source, launches = re.subn(r"([\w:]+(?:<[^<>;]*>)?)<<<(.*?)>>>\(", r"emu::launch(emu::Config{\2}, \1, ", source,
                               flags=re.S)
    assert launches, "no kernel launch found"
    return '#include "emulate.h"\n' + source


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (for the CUDA headers and its host compiler)")
def test_cuda_kernels_match_plain_loops_under_emulation(tmp_path):
    sources = [EMULATOR / "check_kernels.cc"]
    for cu in KERNEL_SOURCES:
        sources.append(tmp_path / f"{cu.stem}.cc")
        sources[-1].write_text(for_emulator(cu.read_text()))
    binary = tmp_path / "check_kernels"
    # nvcc -x c++ compiles as host C++ with its own host compiler and the CUDA headers on the path.
    build = subprocess.run(["nvcc", "-x", "c++", "-std=c++20", "-O2", f"-I{EMULATOR}", f"-I{ROOT / 'csrc' / 'cuda'}",
                            *map(str, sources), "-o", str(binary)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=600)
    failed = [line for line in run.stdout.splitlines() if not line.startswith("ok")]
    assert run.returncode == 0, "\n".join(failed[-30:]) + run.stderr
    assert len(run.stdout.splitlines()) > 300  # every case ran
