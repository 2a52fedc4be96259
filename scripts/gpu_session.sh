#!/usr/bin/env bash
# One device session: build, quick CUDA check, (optionally) the test suite, compute-sanitizer
# on a small case, and the benchmark. Logs under $OUT (or ./gpu_logs).
set -uo pipefail
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export CAPSROUTE_PTXAS_VERBOSE=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
t0=$(date +%s)
python3 setup.py build_ext --inplace -j 16 > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
grep -E "registers|spill" "$OUT/build.log" | sed -E 's/.*(Used [0-9]+ registers).*/\1/' | sort | uniq -c | head -20
for step in "$@"; do
  echo "=== $step"
  case $step in
    check) python3 scripts/cuda_check.py 2>&1 | tee "$OUT/check.log" ;;
    quick) python3 scripts/cuda_check.py --quick --no-time 2>&1 | tee "$OUT/check.log" ;;
    tests) python3 -m pytest -q -x tests 2>&1 | tail -30 | tee "$OUT/tests.log" ;;
    sanitize) compute-sanitizer --tool memcheck python3 scripts/cuda_check.py --quick --no-time 2>&1 | tail -15 | tee "$OUT/sanitize.log" ;;
    bench) python3 benchmarks/ratios.py --suite gpu 2>&1 | tee "$OUT/bench.log" ;;
  esac
done
