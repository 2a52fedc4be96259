#!/usr/bin/env bash
# One device session: build, then the named steps (check, quick, tests, sanitize, bench).
# Logs under $OUT (or ./gpu_logs). Used on the lent H100 (see benchmarks/RESULTS.md).
set -uo pipefail
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export CAPSROUTE_PTXAS_VERBOSE=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
t0=$(date +%s)
python3 setup.py build_ext --inplace -j 16 > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
for step in "$@"; do
  echo "=== $step ($(date +%T))"
  case $step in
    check) python3 scripts/cuda_check.py 2>&1 | grep -v Warning | tee "$OUT/check.log" ;;
    quick) python3 scripts/cuda_check.py --quick --no-time 2>&1 | tee "$OUT/check.log" ;;
    tests) timeout 300 python3 -m pytest -q -x -k cuda -p no:cacheprovider tests 2>&1 | tail -25 | tee "$OUT/tests.log" ;;
    sanitize)
      for tool in memcheck racecheck initcheck synccheck; do
        compute-sanitizer --tool $tool --error-exitcode 9 python3 scripts/cuda_check.py --tiny > "$OUT/sanitize_$tool.log" 2>&1
        echo "$tool: exit $? $(grep -E 'ERROR SUMMARY' "$OUT/sanitize_$tool.log" | tail -1)"
      done ;;
    bench) timeout 400 python3 benchmarks/ratios.py --suite gpu 2>&1 | grep -v Warning | tee "$OUT/bench.log" ;;
  esac
done
