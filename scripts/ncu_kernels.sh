#!/usr/bin/env bash
# Nsight Compute on the fused op's kernels (one forward+backward of the canonical shape after a
# warm-up): occupancy, issue and stall statistics per kernel, and per-instruction stall samples
# (SASS) of the heaviest kernels. A diagnostic for a lent GPU; logs under $OUT.
#   bash scripts/ncu_kernels.sh [batch]
set -uo pipefail
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
cp build/device/capsroute/_C.abi3.so capsroute/ 2>/dev/null  # the prebuilt extension (scripts/prebuild_device.sh)
B=${1:-128}
cat > /tmp/ncu_driver.py <<PY
import torch, capsroute
g = torch.Generator(device="cuda").manual_seed(0)
u = torch.randn($B, 1152, 8, device="cuda", generator=g).requires_grad_()
W = (torch.randn(1152, 10, 16, 8, device="cuda", generator=g) * 0.04).requires_grad_()
gv = torch.randn($B, 10, 16, device="cuda", generator=g)
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
rep=/tmp/caps
# --clock-control none: the card's clocks as found (ncu would otherwise lock them to base).
timeout 240 ncu --profile-from-start off --clock-control none -k regex:"routing_pass|weight_grad" \
  --section SpeedOfLight --section Occupancy --section LaunchStats --section SchedulerStats \
  --section WarpStateStats --section MemoryWorkloadAnalysis --section SourceCounters \
  --section ComputeWorkloadAnalysis --section InstructionStats \
  -f -o $rep python3 /tmp/ncu_driver.py > "$OUT/ncu_run.log" 2>&1
echo "ncu: exit $?"; tail -3 "$OUT/ncu_run.log"
ncu -i $rep.ncu-rep --page details > "$OUT/ncu_details.txt" 2>&1
# Per-instruction SASS with stall samples: weight_grad and the forward pass at t = 2.
ncu -i $rep.ncu-rep --page source --csv --print-source sass -k regex:weight_grad > "$OUT/ncu_src_weight_grad.csv" 2>&1
ncu -i $rep.ncu-rep --page source --csv --print-source sass -k regex:routing_pass --launch-skip 1 --launch-count 1 > "$OUT/ncu_src_pass_fwd.csv" 2>&1
ncu -i $rep.ncu-rep --page source --csv --print-source sass -k regex:routing_pass --launch-skip 3 --launch-count 1 > "$OUT/ncu_src_pass_grad.csv" 2>&1
ls -la "$OUT"
grep -E "^  [a-z_]|Duration|Registers Per|Achieved Occupancy|Theoretical Occupancy|Issue Slots Busy|No Eligible|Active Warps Per|Eligible Warps|Warp Cycles Per Issued|Local Memory|Block Limit" "$OUT/ncu_details.txt" | head -150
