#!/usr/bin/env bash
# Nsight Compute on the fused op's kernels (one forward+backward after a warm-up, the canonical
# shape unless told): occupancy, issue and stall statistics and memory throughput per kernel,
# and per-instruction stall samples (SASS) of the heaviest kernels. A diagnostic for a lent
# GPU; logs under $OUT, named after the shape.
#   bash scripts/ncu_kernels.sh [batch] [n_in] [n_out]
#   bash scripts/ncu_kernels.sh 128 32768 64     # the scale shape (the statistics passes too)
set -uo pipefail
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
cp build/device/capsroute/_C.abi3.so capsroute/ 2>/dev/null  # the prebuilt extension (scripts/prebuild_device.sh)
B=${1:-128} N_IN=${2:-1152} N_OUT=${3:-10}
tag=b${B}_${N_IN}x${N_OUT}${CAPSROUTE_ROW_DIRECT:+_direct$CAPSROUTE_ROW_DIRECT}  # the row passes' switch, if set
cat > /tmp/ncu_driver.py <<PY
import torch, capsroute
g = torch.Generator(device="cuda").manual_seed(0)
u = torch.randn($B, $N_IN, 8, device="cuda", generator=g).requires_grad_()
W = (torch.randn($N_IN, $N_OUT, 16, 8, device="cuda", generator=g) * (8 * $N_IN) ** -0.5 * 4).requires_grad_()
gv = torch.randn($B, $N_OUT, 16, device="cuda", generator=g)
def step():
    v = capsroute.dynamic_routing(u, W, 3)
    torch.autograd.grad(v, (u, W), gv)
for _ in range(3):
    step()
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStart()
step()
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStop()
PY
rep=/tmp/caps_$tag
# --clock-control none: the card's clocks as found (ncu would otherwise lock them to base).
timeout 240 ncu --profile-from-start off --clock-control none -k regex:"routing_pass|row_pass|weight_grad|group_stats|finish_iteration|sweep_step" \
  --section SpeedOfLight --section Occupancy --section LaunchStats --section SchedulerStats \
  --section WarpStateStats --section MemoryWorkloadAnalysis --section SourceCounters \
  --section ComputeWorkloadAnalysis --section InstructionStats \
  -f -o $rep python3 /tmp/ncu_driver.py > "$OUT/ncu_${tag}_run.log" 2>&1
echo "ncu: exit $?"; tail -3 "$OUT/ncu_${tag}_run.log"
ncu -i $rep.ncu-rep --page details > "$OUT/ncu_${tag}_details.txt" 2>&1
# Per-instruction SASS with stall samples: weight_grad, the forward pass at t = 2 and the
# first gradient pass (launches 1 and 3 of the passes). The passes are row_pass_kernel where
# it applies (the canonical shape; CAPSROUTE_ROW_PASS=0 turns it off), else routing_pass.
pass=row_pass
[ "${CAPSROUTE_ROW_PASS:-1}" = 0 ] || [ "$N_OUT" -gt 10 ] && pass=routing_pass
ncu -i $rep.ncu-rep --page source --csv --print-source sass -k regex:weight_grad > "$OUT/ncu_${tag}_src_weight_grad.csv" 2>&1
ncu -i $rep.ncu-rep --page source --csv --print-source sass -k regex:$pass --launch-skip 1 --launch-count 1 > "$OUT/ncu_${tag}_src_pass_fwd.csv" 2>&1
ncu -i $rep.ncu-rep --page source --csv --print-source sass -k regex:$pass --launch-skip 3 --launch-count 1 > "$OUT/ncu_${tag}_src_pass_grad.csv" 2>&1
ls -la "$OUT"
grep -E "^  [a-z_]|Duration|Registers Per|Achieved Occupancy|Theoretical Occupancy|Issue Slots Busy|No Eligible|Active Warps Per|Eligible Warps|Warp Cycles Per Issued|Local Memory|Block Limit|Throughput|Hit Rate|Shared Memory Configuration Size" "$OUT/ncu_${tag}_details.txt" | head -150
