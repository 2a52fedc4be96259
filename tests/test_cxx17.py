"""The C++ sources compile as C++17 against torch 2.11's headers.

torch builds extensions in the C++ standard its headers need: C++20 from torch 2.13 on (the
torch of this machine and CI), C++17 for torch 2.11 — the torch of the lent GPU machine, and
of users on older releases. A C++20-only feature (std::bit_cast, say) passes every other test
here and then fails the build there, so this checks each source with g++ -std=c++17
-fsyntax-only against torch 2.11's include folder. The CUDA sources are checked through the
CPU emulation's translation unit (csrc/emu/emu_ops.cpp includes the kernels, the launch
sequences and the op entry points); only their nvcc-only branches (inline PTX) are not.

The headers come from torch 2.11.0's wheel on PyPI (downloaded once into build/torch-2.11.0,
about 530 MB, of which the 40 MB of headers are kept); without the registry the test skips.
"""
from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TORCH_VERSION = "2.11.0"
CACHE = ROOT / "build" / f"torch-{TORCH_VERSION}"
SOURCES = sorted(str(p.relative_to(ROOT)) for p in [ROOT / "csrc" / "capsroute.cpp",
                                                     *(ROOT / "csrc" / "cpu").glob("*.cpp")])


@pytest.fixture(scope="module")
def torch_include() -> pathlib.Path:
    include = CACHE / "torch" / "include"
    if (CACHE / "complete").exists():
        return include
    if shutil.which("g++") is None:
        pytest.skip("no g++")
    wheels = CACHE / "wheel"
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64",
           f"torch=={TORCH_VERSION}", "-d", str(wheels)]
    got = subprocess.run(cmd, capture_output=True, text=True)
    if got.returncode != 0:
        pytest.skip(f"torch {TORCH_VERSION}'s wheel could not be downloaded: {got.stderr[-300:]}")
    (wheel,) = wheels.glob("torch-*.whl")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(CACHE, [n for n in z.namelist() if n.startswith("torch/include/")])
    shutil.rmtree(wheels)
    (CACHE / "complete").touch()
    return include


@pytest.mark.parametrize("source,defines", [(s, []) for s in SOURCES] +
                         [("csrc/emu/emu_ops.cpp", ["-DCAPSROUTE_EMULATE"])],
                         ids=SOURCES + ["csrc/emu/emu_ops.cpp"])
def test_compiles_as_cxx17(torch_include, source, defines):
    cmd = ["g++", "-std=c++17", "-fsyntax-only", "-fopenmp", *defines,
           f"-I{torch_include}", f"-I{torch_include / 'torch' / 'csrc' / 'api' / 'include'}",
           f"-I{sysconfig.get_paths()['include']}", str(ROOT / source)]
    got = subprocess.run(cmd, capture_output=True, text=True)
    errors = [line for line in got.stderr.splitlines() if "error" in line]
    assert got.returncode == 0, "\n".join(errors[:10]) or got.stderr[-2000:]
