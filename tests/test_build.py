"""setup.py's own checks, run as a user would run it (python setup.py, in a subprocess).

With the CUDA kernels asked for where no GPU is visible (FORCE_CUDA=1: a build host, a
cluster's login node) and no TORCH_CUDA_ARCH_LIST, torch's extension builder has no
architecture to build for and fails with an IndexError from inside torch. setup.py says what
to set instead. Needs a CUDA build of torch and a CUDA toolkit (as in CI); skips elsewhere,
and on a machine with a GPU, where torch builds for the GPUs it sees.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch
from torch.utils import cpp_extension

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _setup_name(**env: str) -> subprocess.CompletedProcess:
    """`python setup.py --name`: runs setup.py's module code (which plans the extension) and
    builds nothing."""
    environ = {k: v for k, v in os.environ.items()
               if k not in ("TORCH_CUDA_ARCH_LIST", "CAPSROUTE_CPU_ONLY")}
    environ.update(env)
    return subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(torch.version.cuda is None or cpp_extension.CUDA_HOME is None,
                    reason="needs a CUDA build of torch and a CUDA toolkit")
@pytest.mark.skipif(torch.cuda.device_count() > 0, reason="a GPU is visible")
def test_cuda_build_without_a_gpu_asks_for_the_architectures():
    env = {"FORCE_CUDA": "1", "CUDA_HOME": cpp_extension.CUDA_HOME}
    for unset in ({}, {"TORCH_CUDA_ARCH_LIST": "native"}):
        out = _setup_name(**env, **unset)
        assert out.returncode != 0
        assert "needs TORCH_CUDA_ARCH_LIST" in out.stderr and "IndexError" not in out.stderr, \
            out.stderr
    out = _setup_name(**env, TORCH_CUDA_ARCH_LIST="9.0")
    assert out.returncode == 0 and out.stdout.strip().endswith("capsroute"), out.stderr
    out = _setup_name(**env, CAPSROUTE_CPU_ONLY="1")
    assert out.returncode == 0 and out.stdout.strip().endswith("capsroute"), out.stderr
