#!/usr/bin/env bash
# compute-sanitizer over the CUDA kernels: memcheck (out-of-bounds and misaligned accesses),
# racecheck (shared-memory races), initcheck (reads of uninitialised device memory) and
# synccheck (barrier misuse), each running tests/sanitize_driver.py, which calls every op
# forward and backward on small shapes with every option and dtype and compares with the CPU.
#
#   tests/sanitize_cuda.sh [tool ...]      (default: all four tools)
#
# Environment: PYTHON (default .venv/bin/python if present, else python3), COMPUTE_SANITIZER
# (default: on PATH, else $CUDA_HOME/bin or /usr/local/cuda/bin).
# Exit status: 0 when every tool ran clean; 1 on any sanitizer error or result mismatch;
# 2 when there is nothing to check (no GPU, no CUDA kernels in the build, no sanitizer).
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
SANITIZER=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || true)}
for candidate in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" /usr/local/cuda/bin/compute-sanitizer; do
  [[ -n "$SANITIZER" ]] && break
  [[ -x "$candidate" ]] && SANITIZER=$candidate
done
if [[ -z "$SANITIZER" ]]; then
  echo "sanitize_cuda: compute-sanitizer not found (set COMPUTE_SANITIZER)" >&2
  exit 2
fi

# No GPU or no CUDA kernels: say so and stop (exit 2), before paying for a sanitizer run.
"$PYTHON" tests/sanitize_driver.py --check-only || exit $?

# One cudaMalloc per tensor, so that an access past a tensor's end leaves its allocation
# instead of landing in a neighbour inside the caching allocator's block.
export PYTORCH_NO_CUDA_MEMORY_CACHING=1

tools=("$@")
[[ ${#tools[@]} -eq 0 ]] && tools=(memcheck racecheck initcheck synccheck)
status=0
for tool in "${tools[@]}"; do
  echo "=== compute-sanitizer --tool $tool"
  if "$SANITIZER" --tool "$tool" --error-exitcode 1 --print-limit 50 \
       "$PYTHON" tests/sanitize_driver.py; then
    echo "=== $tool: clean"
  else
    echo "=== $tool: FAILED" >&2
    status=1
  fi
done
exit $status
