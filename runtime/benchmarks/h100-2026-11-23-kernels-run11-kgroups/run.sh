#!/usr/bin/env bash
# CUDA kernel tests, prefill bench with sweep, ncu of the default prefill kernels.
set -uo pipefail
mkdir -p "$OUT"
export CUDA_PATH=${CUDA_PATH:-/usr/local/cuda}
export LD_LIBRARY_PATH="$CUDA_PATH/lib64:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
echo "== CUDA kernel tests =="
timeout 200 devbin/k/kernels cuda_ > "$OUT/cuda_tests.log" 2>&1
grep -E "^test |test result|panicked|relative error|element" "$OUT/cuda_tests.log" | head -40
echo "== lora_bench $* =="
timeout 300 devbin/k/lora_bench --csv "$OUT/bench.csv" "$@" 2> "$OUT/bench.err" | grep "^#"
tail -3 "$OUT/bench.err"
python3 runtime/scripts/summarize.py "$OUT/bench.csv" "$OUT/none.csv" > "$OUT/summary.md"
grep -E "T=4096" "$OUT/bench.csv" | grep -E "segmented|default|chunked" 
SECT="--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy --section LaunchStats --section SchedulerStats"
for k in shrink_mma expand_mma; do
  timeout 60 ncu --clock-control none --cache-control none -k regex:$k --launch-count 1 $SECT devbin/k/lora_bench --profile-pass --case "qkv R=16 T=4096" > "$OUT/ncu_$k.txt" 2>&1
  grep -E "^  [a-z_]+.*\(|Duration|DRAM Throughput|Warp Cycles Per Issued|Active Warps Per Sch|Registers Per|Dynamic Shared|Block Size|Grid Size|One or More Eligible|cycles being stalled" "$OUT/ncu_$k.txt" | head -14
done
