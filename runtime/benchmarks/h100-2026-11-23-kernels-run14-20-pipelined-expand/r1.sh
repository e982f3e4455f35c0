#!/usr/bin/env bash
# Pipelined expand: its CUDA tests first, then the prefill sweep and one ncu profile.
set -uo pipefail
mkdir -p "$OUT"
export CUDA_PATH=${CUDA_PATH:-/usr/local/cuda}
export LD_LIBRARY_PATH="$CUDA_PATH/lib64:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
echo "== one pipelined expand case (a hang shows here) =="
timeout 60 devbin/k/lora_bench --prefill-only --quick --case "qkv R=16 T=4096" > "$OUT/quick.out" 2>&1; echo "quick rc=$?"
grep -E "segmented|m2 n8 s" "$OUT/quick.out" | cut -d, -f1-5 | head
echo "== CUDA prefill expand + chunked tests =="
timeout 300 devbin/k/kernels cuda_bf16::prefill_expand cuda_bf16::chunked_prefill cuda_f32::prefill_expand > "$OUT/cuda_tests.log" 2>&1; rc=$?
grep -E "^test |test result|panicked" "$OUT/cuda_tests.log" | head -20
[ $rc -ne 0 ] && { grep -v "^$" "$OUT/cuda_tests.log" | tail -40 | cut -c1-600; exit 1; }
echo "== lora_bench --prefill-only =="
timeout 300 devbin/k/lora_bench --prefill-only --csv "$OUT/bench.csv" > "$OUT/bench.out" 2> "$OUT/bench.err"; echo "bench rc=$?"
tail -2 "$OUT/bench.err"
grep -E "expand|segmented" "$OUT/bench.csv" | cut -d, -f1-5 | sort -t, -k1,1 -k4,4g | awk -F, '{c[$1]++; if (c[$1]<=6 || $2 ~ /default|segmented|cuda-core|m2 n8,|m2 n8 tile/) print}'
SECT="--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy --section LaunchStats"
timeout 60 ncu --clock-control none --cache-control none -k regex:expand_mma_pipelined --launch-skip 1 --launch-count 1 $SECT devbin/k/lora_bench --profile-pass --case "qkv R=16 T=4096" > "$OUT/ncu_expand.txt" 2>&1
grep -E "^  [a-z_]+.*\(|Duration|DRAM Throughput|Warp Cycles Per Issued|Active Warps Per Sch|Registers Per|Dynamic Shared|Achieved Occupancy|Theoretical Occupancy|cycles being stalled" "$OUT/ncu_expand.txt" | head -16
