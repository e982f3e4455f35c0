#!/usr/bin/env bash
# Run 20: shared expand prologue and B staging helpers: prefill defaults, CUDA tests.
set -uo pipefail
mkdir -p "$OUT"
export CUDA_PATH=${CUDA_PATH:-/usr/local/cuda}
export LD_LIBRARY_PATH="$CUDA_PATH/lib64:${LD_LIBRARY_PATH:-}"
B=devbin/k/lora_bench
echo "== prefill defaults =="
timeout 90 $B --prefill-only --variant zzz --csv "$OUT/defaults.csv" > /dev/null 2> "$OUT/defaults.err"; echo "rc=$?"
cut -d, -f1-5,10-11 "$OUT/defaults.csv"
echo "== CUDA prefill expand + chunked tests =="
timeout 300 devbin/k/kernels cuda_bf16::prefill_expand cuda_bf16::chunked_prefill cuda_f32::prefill_expand cuda_f32::chunked_prefill > "$OUT/cuda_tests.log" 2>&1; echo "rc=$?"
grep -E "^test .*(ok|FAILED)$|test result|panicked" "$OUT/cuda_tests.log" | head
