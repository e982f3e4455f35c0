#!/usr/bin/env bash
# ncu on the prefill expand variants (qkv R=16 T=4096).
set -uo pipefail
mkdir -p "$OUT"
export CUDA_PATH=${CUDA_PATH:-/usr/local/cuda}
export LD_LIBRARY_PATH="$CUDA_PATH/lib64:${LD_LIBRARY_PATH:-}"
B=devbin/k/lora_bench
SECT="--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy --section LaunchStats --section SchedulerStats"
NCU="ncu --clock-control none --cache-control none"
summ() { grep -E "^  [a-z_]+.*\(|Duration|DRAM Throughput|Warp Cycles Per Issued|Achieved Occupancy|Theoretical Occupancy|Registers Per|Dynamic Shared|Static Shared|Block Size|Grid Size|Block Limit|Issue Slots Busy|One or More Eligible|Active Warps Per|Waves Per SM" "$1" | head -40; grep -E "^    (OPT|INF).*(stall|Stall|occupancy|Occupancy)" "$1" | cut -c1-400 | head -6; }
C="qkv R=16 T=4096"
timeout 150 $NCU -k regex:expand_mma_pipelined --launch-count 1 $SECT $B --profile-pass --case "$C" --variant zzz > "$OUT/ncu_default.txt" 2>&1
echo "== default (m2 n8 s4) =="; summ "$OUT/ncu_default.txt"
timeout 150 $NCU -k regex:expand_mma_pipelined --launch-skip 3 --launch-count 1 $SECT $B --profile-pass --case "$C" --variant "expand m1 n8 s3 x4" > "$OUT/ncu_m1n8s3.txt" 2>&1
echo "== m1 n8 s3 x4 =="; summ "$OUT/ncu_m1n8s3.txt"
timeout 150 $NCU -k regex:expand_mma_kernel --launch-count 1 $SECT $B --profile-pass --case "$C" --variant "expand m2 n8" > "$OUT/ncu_reg.txt" 2>&1
echo "== register m2 n8 =="; summ "$OUT/ncu_reg.txt"
