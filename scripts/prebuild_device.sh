#!/usr/bin/env bash
# Builds capsroute's extension on this (CPU) machine for the lent GPU machine — torch
# 2.11.0+cu130 there, an H100 (sm_90) — into build/device/, so that a device session carries
# it (the device tool's carry: ["build/device"]) and skips its own ~140 s build, a sixth of
# the session's device time. scripts/gpu_session.sh uses it only when the digest of csrc/ and
# setup.py matches and it loads there with its CUDA kernels registered; otherwise it builds.
# 3 to 10 minutes on 2 cores (3 at 0593017, torch 2.11's install included). The build
# environment, build/device-venv, is torch 2.11.0 from PyPI (its +cu130 build) over the main
# .venv's packages (the CUDA libraries torch loads).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/device_build.sh
VENV=build/device-venv
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch; assert torch.__version__ == '2.11.0+cu130'" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --no-deps torch==2.11.0
  echo "$PWD/.venv/lib/python3.11/site-packages" > "$VENV/lib/python3.11/site-packages/main-venv.pth"
fi
# The previous build stays as build/device_prev, for gpu_session.sh's per-kernel A/B (`ab`);
# build/device-temp stays too: ninja rebuilds only what changed.
rm -rf build/device_prev
[ -d build/device ] && mv build/device build/device_prev
# Portable: the CPU kernels must not use this machine's vector extensions on another CPU.
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} FORCE_CUDA=1 CAPSROUTE_PORTABLE=1 TORCH_CUDA_ARCH_LIST=9.0 \
  CAPSROUTE_PTXAS_VERBOSE=1 \
  MAX_JOBS=${MAX_JOBS:-2} "$VENV/bin/python" setup.py build_ext --build-lib build/device \
  --build-temp build/device-temp > build/device-build.log 2>&1 || { tail -30 build/device-build.log; exit 1; }
source_digest > build/device/sources.digest
ptxas_summary build/device-build.log > build/device/ptxas.txt
# It must load against torch 2.11 (here without a GPU: the CPU op runs).
(cd build/device && PYTHONPATH=$PWD "../../$VENV/bin/python" -c "
import torch, capsroute._C
assert torch._C._dispatch_has_kernel_for_dispatch_key('capsroute::dynamic_routing', 'CUDA')
u, w = torch.randn(2, 5, 8), torch.randn(5, 3, 16, 8)
v, c, s = torch.ops.capsroute.dynamic_routing(u, w, None, 3, False, False, 1e-8, False)
print('build/device/capsroute/_C.abi3.so: torch', torch.__version__, 'v', tuple(v.shape))")
ls -la build/device/capsroute/
