#!/usr/bin/env bash
set -uo pipefail
mkdir -p "$OUT"
export CUDA_PATH=${CUDA_PATH:-/usr/local/cuda}
export LD_LIBRARY_PATH="$CUDA_PATH/lib64:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
echo "== CUDA kernel tests =="
timeout 240 devbin/k/kernels cuda_ > "$OUT/cuda_tests.log" 2>&1; rc=$?
grep -E "test result|panicked|FAILED|failed" "$OUT/cuda_tests.log" | head -20
echo "tests rc=$rc"
[ $rc -ne 0 ] && { tail -30 "$OUT/cuda_tests.log"; exit 1; }
echo "== lora_bench $* =="
timeout 280 devbin/k/lora_bench --csv "$OUT/bench.csv" "$@" 2> "$OUT/bench.err" | grep "^#"
tail -2 "$OUT/bench.err"
grep -E "segmented|default|chunked| s[234]" "$OUT/bench.csv" | cut -d, -f1-5
SECT="--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy --section LaunchStats --section SchedulerStats"
timeout 60 ncu --clock-control none --cache-control none -k regex:pipelined --launch-skip 21 --launch-count 1 $SECT devbin/k/lora_bench --profile-pass --case "qkv R=16 T=4096" > "$OUT/ncu_pipelined.txt" 2>&1
grep -E "^  [a-z_]+.*\(|Duration|DRAM Throughput|Warp Cycles Per Issued|Active Warps Per Sch|Registers Per|Dynamic Shared|One or More Eligible|cycles being stalled" "$OUT/ncu_pipelined.txt" | head -12
