"""Build capsroute: the CPU kernels always, the CUDA kernels when a toolkit and a CUDA build
of torch are present.

Environment variables:
  CAPSROUTE_CPU_ONLY=1   never build the CUDA kernels
  FORCE_CUDA=1           build them even where torch sees no GPU (CI, build machines)
  CAPSROUTE_PORTABLE=1   no -march=native: a binary that runs on any x86-64 CPU
  CUDA_HOME              the toolkit (e.g. /usr/local/cuda)
  TORCH_CUDA_ARCH_LIST   GPU architectures, e.g. "9.0" (unset: those of the visible GPUs;
                         needed where none is visible). The kernels run on 8.0 and newer.

Install with `pip install --no-build-isolation -e .` so the build sees the torch you run.
"""
import glob
import os
import platform

from setuptools import find_packages, setup
from torch.utils import cpp_extension


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def _want_cuda() -> bool:
    if _flag("CAPSROUTE_CPU_ONLY"):
        return False
    import torch

    has_toolkit = cpp_extension.CUDA_HOME is not None
    has_cuda_torch = torch.version.cuda is not None
    return has_toolkit and has_cuda_torch and (_flag("FORCE_CUDA") or torch.cuda.is_available())


def _check_arch_list() -> None:
    """Unset (or "native"), TORCH_CUDA_ARCH_LIST means the architectures of the GPUs torch sees. Where it
    sees none (FORCE_CUDA=1 on a build host or a cluster's login node), torch's extension
    builder fails with an IndexError from deep inside it (torch 2.13 and 2.14): say what to
    set."""
    import torch

    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if (arch_list and arch_list != "native") or torch.cuda.device_count() > 0:
        return
    raise SystemExit(
        "capsroute: building the CUDA kernels where no GPU is visible (FORCE_CUDA=1) needs "
        "TORCH_CUDA_ARCH_LIST: the compute capabilities of the GPUs it will run on, e.g. "
        "TORCH_CUDA_ARCH_LIST=\"8.0;9.0\" for A100 and H100 (8.6 for RTX 30xx and A10, 8.9 for "
        "RTX 40xx, L4 and L40, 12.0 for RTX 50xx). Each one adds to the build time. The "
        "kernels need 8.0 or newer; set CAPSROUTE_CPU_ONLY=1 to build the CPU kernels only."
    )


def _extension():
    sources = ["csrc/capsroute.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3"]  # the C++ standard is the one torch asks for (C++20 from torch 2.10 on)
    # The CPU kernels are plain loops written for the auto-vectoriser; with the host's vector
    # units (AVX2/FMA on x86-64) they run several times faster. A source build runs where it
    # was built; set CAPSROUTE_PORTABLE=1 to build a binary for other machines.
    if not _flag("CAPSROUTE_PORTABLE") and platform.machine() in ("x86_64", "AMD64"):
        cxx.append("-march=native")
    # at::parallel_for is a header template: it runs the CPU kernels on torch's threads only
    # where the extension itself is compiled with OpenMP (without it, it quietly runs on
    # one thread). The OpenMP runtime is the one torch has already loaded (same soname),
    # so torch.set_num_threads applies.
    link = []
    if platform.system() == "Linux":
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if _want_cuda():
        _check_arch_list()
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        # -lineinfo maps SASS to source lines for the profilers. -compress-all compresses every
        # image of the fat binary: nvcc's default left some uncompressed, which more than
        # doubled the extension (37 MB against 16 MB).
        nvcc = ["-O3", "-lineinfo", "-Xfatbin=-compress-all"]
        if _flag("CAPSROUTE_PTXAS_VERBOSE"):  # the register / spill report of every kernel
            nvcc.append("-Xptxas=-v")
        return cpp_extension.CUDAExtension(
            "capsroute._C",
            sources,
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link,
            py_limited_api=True,
        )
    return cpp_extension.CppExtension(
        "capsroute._C",
        sources,
        extra_compile_args={"cxx": cxx},
        extra_link_args=link,
        py_limited_api=True,
    )


setup(
    name="capsroute",
    version="0.1.0",
    description="Fused, differentiable dynamic routing for capsule networks (CPU and CUDA)",
    packages=find_packages(include=["capsroute", "capsroute.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
