#!/usr/bin/env bash
# Run 22: stage barriers selected by one arrive helper, one pipelining check: CUDA tests of the
# kernels that use them (prefill shrink, prefill expand, chunked prefill).
set -uo pipefail
mkdir -p "$OUT"
export CUDA_PATH=${CUDA_PATH:-/usr/local/cuda}
export LD_LIBRARY_PATH="$CUDA_PATH/lib64:${LD_LIBRARY_PATH:-}"
timeout 420 devbin/k/kernels cuda_bf16::prefill_shrink cuda_bf16::prefill_expand cuda_bf16::chunked_prefill > "$OUT/cuda_tests.log" 2>&1; echo "rc=$?"
grep -E "^test .*(ok|FAILED)$|test result|panicked" "$OUT/cuda_tests.log" | head
