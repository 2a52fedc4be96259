#!/usr/bin/env bash
# One device session: build, then the named steps, each under its own time limit so that a
# call stays inside the device tool's 10 minutes. Logs under $OUT (or ./gpu_logs).
#   check     float64 all-options check against the reference, float32/half errors,
#             determinism (scripts/cuda_check.py --no-time)
#   quick     the same on fewer cases
#   bench     benchmarks/ratios.py --suite gpu --graph: B=32/128/512, bf16, the scale shape,
#             memory; each call also replayed from a CUDA graph
#   bench-ma  B=128 also against torch.compile(mode="max-autotune") (several minutes)
#   profile   the fused op's per-kernel times and host overhead, canonical and scale shapes
#   host      the host side of a forward+backward: the host time of its pieces (raw ops, the
#             forward with autograd, the whole, the engine's own), then CPU time per operator
#             and runtime call; B=128 float32 and bfloat16, B=32 float32 (at 3245b3d the eager
#             forward+backward took 0.476 ms at B=32 against 0.158 by graph replay); then the
#             host time of the functions against a C++ autograd prototype of the same ops
#             (scripts/host_autograd_cxx.py: what Python autograd costs on this host)
#   The A/B steps below time each value of an environment switch side by side in one process
#   (benchmarks/switches.py: the same results checked first, then GPU time by CUDA graph
#   replay, the eager forward+backward, and each kernel's time), a few seconds a setting
#   where a process per setting (profile_cuda.py, up to 40 s each) took 160-320 s a step:
#   rows      the row passes (forward and gradient; float32's default where they apply) against
#             routing_pass_kernel's (CAPSROUTE_ROW_PASS=0): B=128 and 512, float32, bfloat16
#   direct    the row passes with the lanes reading W[i]'s operands themselves, no block
#             barrier in the walk (CAPSROUTE_ROW_DIRECT=1), against the block staging them
#             (the default, =0): B=128, 32, 512 float32, and B=128 bfloat16 on the row passes
#   cluster   the same crossed with the row passes in thread-block clusters of 2, 4 and 8 blocks
#             that add up their partial sums on chip (CAPSROUTE_ROW_CLUSTER; unset: none), at
#             B=128, 32 and 512 float32: 8 settings a shape, `direct`'s float32 part included
#   capsgrad  the kept last pass on weight_grad_capsules_kernel (the default where it applies)
#             against weight_grad_kernel (CAPSROUTE_CAPSULE_GRAD=0), and with 5 and 6 warps
#             a block: B=128 and 32
#   walk      a group's forward and gradient passes walking the predictions once (the default
#             where W[i] is staged as operands) against twice (CAPSROUTE_GROUP_WALK=0): the
#             scale shape
#   chunks    the row passes' chunks of input capsules: CAPSROUTE_ROW_BLOCKS_PER_SM unset
#             (2 blocks per SM), 1, 2, 4 and 8, at B=32 and B=512
#   park      the last pass that recomputes the couplings with the rows it reads twice parked
#             in shared memory (the default where they fit) against read twice from L2
#             (CAPSROUTE_PARK_ROWS=0): the scale shape, then B=128 float32 and bfloat16 with
#             CAPSROUTE_COUPLING_CACHE_MB=0
#   first     the forward's first iteration as one matrix product (first_sums_kernel, the default
#             where D_in % 8 == 0) against the pass (CAPSROUTE_FIRST_SUMS=0): B=128, 32, 512
#             float32, B=128 bfloat16, then the scale shape
#   tests     the test suite's CUDA cases
#   ncu       Nsight Compute on the canonical shape's kernels (scripts/ncu_kernels.sh)
#   ncu-direct the same with CAPSROUTE_ROW_DIRECT=1 (see direct)
#   ncu-scale the same on the 32768x64 scale shape
#   sanitize  compute-sanitizer memcheck/racecheck/initcheck/synccheck on a tiny case
#   ab        the profile (canonical and scale shapes) of each other carried build,
#             build/device_* (e.g. build/device_prev, which scripts/prebuild_device.sh keeps),
#             then of the current one, each in its own process on this machine: a per-kernel A/B
# The logs end up packed in $OUT/logs.tgz (the device tool brings back only 8 files). The whole
# session keeps inside SESSION_S seconds (default 570, under the tool's 600-second call): each
# step's time limit is cut to what is left, so the logs are packed even when the last step is.
# Build here first (scripts/prebuild_device.sh, then carry ["build/device"]: ~140 s of the
# device's time saved). A session has 15 minutes of device time, the machine's start (a
# minute or two) and its idle time included, and a warm machine goes back after 30 s idle:
# have the second call ready. At 3245b3d (eighteenth session) `quick tests sanitize` and four
# A/B steps took 399 s, `bench host` 148 s, `check` 12 s, `profile chunks` 140 s.
# With kernels changed since the last measurement: one call `SESSION_S=540 ... quick tests
# sanitize first park cluster profile` (correctness first; the steps past the time are skipped), then on
# the warm machine `ncu` (and `ncu-direct`) or `bench host` with the time left (ratios.py
# prints each configuration's times as it finishes them); benchmarks/RESULTS.md's latest
# "To measure next" says which.
set -uo pipefail
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export CAPSROUTE_PTXAS_VERBOSE=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
git log --oneline -1 2>/dev/null | tee "$OUT/version.txt"
t0=$(date +%s)
deadline=$(( t0 + ${SESSION_S:-570} - 10 ))
# cap N: N seconds, or what is left before the deadline if less (at least 1).
cap() { local left=$(( deadline - $(date +%s) )); echo $(( left < $1 ? (left > 1 ? left : 1) : $1 )); }
# A prebuilt extension (scripts/prebuild_device.sh, carried as build/device) when it was built
# from these sources and loads here with its CUDA kernels; else the build (~140 s).
source scripts/device_build.sh
prebuilt=build/device/capsroute/_C.abi3.so
if [ -f "$prebuilt" ] && [ "$(cat build/device/sources.digest 2>/dev/null)" = "$(source_digest)" ] &&
   cp "$prebuilt" capsroute/ && python3 -c "import torch, capsroute._C
assert torch._C._dispatch_has_kernel_for_dispatch_key('capsroute::dynamic_routing', 'CUDA')" 2>> "$OUT/build.log"; then
  echo "prebuilt extension (sources $(source_digest))"
  cp build/device/ptxas.txt "$OUT/" 2>/dev/null
else
  rm -f capsroute/_C*.so
  python3 setup.py build_ext --inplace -j 16 > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
  echo "build: $(( $(date +%s) - t0 )) s"
  ptxas_summary "$OUT/build.log" > "$OUT/ptxas.txt"
fi
# profile_cuda.py with the extension now in capsroute/: the canonical shape (dynamic_routing, then
# route), then the scale shape.
profile_shapes() {
  timeout $(cap 60) python3 scripts/profile_cuda.py
  timeout $(cap 45) python3 scripts/profile_cuda.py --op route
  timeout $(cap 90) python3 scripts/profile_cuda.py --n-in 32768 --n-out 64 --calls 3
}
# switches SECONDS ARGS...: benchmarks/switches.py ARGS with the kernels' times, within SECONDS.
switches() {
  local limit=$1; shift
  timeout $(cap "$limit") python3 benchmarks/switches.py --kernels "$@"
}
for step in "$@"; do
  if [ $(( deadline - $(date +%s) )) -lt 20 ]; then echo "=== $step: skipped, the session's time is spent"; continue; fi
  echo "=== $step ($(date +%T))"
  case $step in
    check) timeout $(cap 200) python3 scripts/cuda_check.py --no-time 2>&1 | grep -v Warning | tee "$OUT/check.log" ;;
    quick) timeout $(cap 120) python3 scripts/cuda_check.py --quick --no-time 2>&1 | grep -v Warning | tee "$OUT/check.log" ;;
    tests) timeout $(cap 300) python3 -m pytest -q -x -k "cuda and not emulation" -p no:cacheprovider tests 2>&1 | tee "$OUT/tests.log" | tail -25 ;;
    sanitize)
      # Without the caching allocator, as tests/sanitize_cuda.sh runs: each tensor its own
      # allocation, so that a write past one is seen, not taken for its neighbour's.
      # cuda_check.py --tiny exits 3 where a result is off (FAIL), the sanitizers 9.
      for tool in memcheck racecheck initcheck synccheck; do
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout $(cap 120) compute-sanitizer --tool $tool --error-exitcode 9 python3 scripts/cuda_check.py --tiny > "$OUT/sanitize_$tool.log" 2>&1
        echo "$tool: exit $? $(grep -E 'ERROR SUMMARY' "$OUT/sanitize_$tool.log" | tail -1) $(grep FAIL "$OUT/sanitize_$tool.log")"
      done ;;
    bench) timeout $(cap 330) python3 benchmarks/ratios.py --suite gpu --graph 2>&1 | grep -v Warning | tee "$OUT/bench.log" ;;
    ncu) timeout $(cap 240) bash scripts/ncu_kernels.sh 2>&1 | tail -60 ;;
    ncu-direct) CAPSROUTE_ROW_DIRECT=1 timeout $(cap 240) bash scripts/ncu_kernels.sh 2>&1 | tail -60 ;;
    ncu-scale) timeout $(cap 240) bash scripts/ncu_kernels.sh 128 32768 64 2>&1 | tail -60 ;;
    profile) profile_shapes 2>&1 | grep -v Warning | tee "$OUT/profile.log" ;;
    host) { for args in "--dtype float32" "--dtype bfloat16" "--batch 32"; do timeout $(cap 60) python3 scripts/profile_cuda.py --host $args; done
      timeout $(cap 120) python3 scripts/host_autograd_cxx.py --batch 32 128 --calls 50; } 2>&1 | grep -v -i warn | tee "$OUT/host.log" ;;
    rows) switches 150 CAPSROUTE_ROW_PASS=0,1 --batch 128 512 --dtype float32 bfloat16 2>&1 | grep -v -i warn | tee "$OUT/rows.log" ;;
    direct) { switches 100 CAPSROUTE_ROW_DIRECT=0,1 --batch 128 32 512
      CAPSROUTE_ROW_PASS=1 switches 50 CAPSROUTE_ROW_DIRECT=0,1 --dtype bfloat16; } 2>&1 | grep -v -i warn | tee "$OUT/direct.log" ;;
    cluster) switches 200 CAPSROUTE_ROW_DIRECT=0,1 CAPSROUTE_ROW_CLUSTER=-,2,4,8 --batch 128 32 512 2>&1 | grep -v -i warn | tee "$OUT/cluster.log" ;;
    capsgrad) switches 100 CAPSROUTE_CAPSULE_GRAD=0,-,5,6 --batch 128 32 2>&1 | grep -v -i warn | tee "$OUT/capsgrad.log" ;;
    walk) switches 150 CAPSROUTE_GROUP_WALK=0,1 --in-caps 32768 --out-caps 64 --rounds 2 --kernel-calls 3 2>&1 | grep -v -i warn | tee "$OUT/walk.log" ;;
    park) { switches 120 CAPSROUTE_PARK_ROWS=0,1 --in-caps 32768 --out-caps 64 --rounds 2 --kernel-calls 3
      CAPSROUTE_COUPLING_CACHE_MB=0 switches 40 CAPSROUTE_PARK_ROWS=0,1 --batch 128 --dtype float32 bfloat16; } 2>&1 | grep -v -i warn | tee "$OUT/park.log" ;;
    first) { switches 90 CAPSROUTE_FIRST_SUMS=0,1 --batch 128 32 512 --dtype float32
      switches 30 CAPSROUTE_FIRST_SUMS=0,1 --batch 128 --dtype bfloat16
      switches 90 CAPSROUTE_FIRST_SUMS=0,1 --in-caps 32768 --out-caps 64 --rounds 2 --kernel-calls 3; } 2>&1 | grep -v -i warn | tee "$OUT/first.log" ;;
    chunks) switches 150 CAPSROUTE_ROW_BLOCKS_PER_SM=-,1,2,4,8 --batch 32 512 2>&1 | grep -v -i warn | tee "$OUT/chunks.log" ;;
    ab)
      cp capsroute/_C.abi3.so "$OUT/.current.so"
      for b in build/device_*/ current; do
        if [ "$b" = current ]; then
          mv "$OUT/.current.so" capsroute/_C.abi3.so
          echo "--- current build (sources $(source_digest))"
        elif [ -f "$b/capsroute/_C.abi3.so" ] && cp "$b/capsroute/_C.abi3.so" capsroute/; then
          echo "--- $b (sources $(cat "$b/sources.digest" 2>/dev/null))"
        else
          continue
        fi
        profile_shapes
      done 2>&1 | grep -v -i warn | tee "$OUT/ab.log" ;;
    bench-ma) timeout $(cap 500) python3 benchmarks/ratios.py --device cuda --batch 128 --max-autotune 2>&1 | grep -v Warning | tee "$OUT/bench_ma.log" ;;
  esac
done
(cd "$OUT" && tar -czf logs.tgz --exclude logs.tgz -- * && find . -type f ! -name logs.tgz -delete)
