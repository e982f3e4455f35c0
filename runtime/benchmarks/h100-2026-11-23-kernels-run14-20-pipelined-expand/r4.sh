#!/usr/bin/env bash
# Final check (run 17): the prefill expand and chunked CUDA tests, then the prefill defaults.
set -uo pipefail
mkdir -p "$OUT"
export CUDA_PATH=${CUDA_PATH:-/usr/local/cuda}
export LD_LIBRARY_PATH="$CUDA_PATH/lib64:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
echo "== CUDA prefill expand + chunked tests =="
timeout 300 devbin/k/kernels cuda_bf16::prefill_expand cuda_bf16::chunked_prefill > "$OUT/cuda_tests.log" 2>&1; echo "rc=$?"
grep -E "^test .*(ok|FAILED)$|test result|panicked" "$OUT/cuda_tests.log" | head
echo "== prefill defaults =="
timeout 90 devbin/k/lora_bench --prefill-only --variant zzz --csv "$OUT/defaults.csv" > /dev/null 2> "$OUT/defaults.err"; echo "rc=$?"
cut -d, -f1-5,10-11 "$OUT/defaults.csv"
