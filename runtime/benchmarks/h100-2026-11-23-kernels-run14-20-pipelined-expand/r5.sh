#!/usr/bin/env bash
# Run 19: expand conversion without the runtime lane index: ncu, prefill defaults, CUDA tests.
set -uo pipefail
mkdir -p "$OUT"
export CUDA_PATH=${CUDA_PATH:-/usr/local/cuda}
export LD_LIBRARY_PATH="$CUDA_PATH/lib64:${LD_LIBRARY_PATH:-}"
B=devbin/k/lora_bench
SECT="--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy --section LaunchStats --section InstructionStats"
timeout 100 ncu --clock-control none --cache-control none -k regex:expand_mma_pipelined --launch-count 1 $SECT $B --profile-pass --case "qkv R=16 T=4096" --variant zzz > "$OUT/ncu_expand_r16.txt" 2>&1
echo "== ncu qkv R=16 expand default =="
grep -E "Duration|DRAM Throughput|Registers Per|Issue Slots Busy|Achieved Occupancy" "$OUT/ncu_expand_r16.txt"; grep -c "local stores" "$OUT/ncu_expand_r16.txt"
echo "== prefill defaults =="
timeout 90 $B --prefill-only --variant zzz --csv "$OUT/defaults.csv" > /dev/null 2> "$OUT/defaults.err"; echo "rc=$?"
cut -d, -f1-5,10-11 "$OUT/defaults.csv"
echo "== CUDA prefill expand + chunked tests =="
timeout 300 devbin/k/kernels cuda_bf16::prefill_expand cuda_bf16::chunked_prefill > "$OUT/cuda_tests.log" 2>&1; echo "rc=$?"
grep -E "^test .*(ok|FAILED)$|test result|panicked" "$OUT/cuda_tests.log" | head
