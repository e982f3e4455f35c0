#!/usr/bin/env bash
# ncu (run 18): rank-64 prefill shrink default, and the new default expand at rank 16.
set -uo pipefail
mkdir -p "$OUT"
export CUDA_PATH=${CUDA_PATH:-/usr/local/cuda}
export LD_LIBRARY_PATH="$CUDA_PATH/lib64:${LD_LIBRARY_PATH:-}"
B=devbin/k/lora_bench
SECT="--section SpeedOfLight --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables --section WarpStateStats --section Occupancy --section LaunchStats --section SchedulerStats --section ComputeWorkloadAnalysis --section InstructionStats"
NCU="ncu --clock-control none --cache-control none"
summ() { grep -E "^  [a-z_]+.*\(|Duration|DRAM Throughput|Compute \(SM\) Throughput|L1/TEX Cache Throughput|L2 Cache Throughput|Warp Cycles Per Issued|Achieved Occupancy|Theoretical Occupancy|Registers Per|Dynamic Shared|Block Limit|Issue Slots Busy|One or More Eligible|Active Warps Per|Executed Ipc|Shared.*Bank|Stall" "$1" | head -40; grep -E "^    (OPT|INF|WRN)" -A2 "$1" | cut -c1-300 | head -30; }
timeout 150 $NCU -k regex:shrink_mma_pipelined --launch-count 1 $SECT $B --profile-pass --case "qkv R=64 T=4096" --variant zzz > "$OUT/ncu_shrink_r64.txt" 2>&1
echo "== qkv R=64 shrink default =="; summ "$OUT/ncu_shrink_r64.txt"
timeout 150 $NCU -k regex:expand_mma_pipelined --launch-count 1 $SECT $B --profile-pass --case "qkv R=16 T=4096" --variant zzz > "$OUT/ncu_expand_r16.txt" 2>&1
echo "== qkv R=16 expand default (m1 n8 s3) =="; summ "$OUT/ncu_expand_r16.txt"
