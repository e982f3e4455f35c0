#!/usr/bin/env bash
# Check of the 64-row-block shrink default (64-token tiles of 2×4-fragment warp blocks,
# 2026-11-23): the CUDA tests that run the automatic choice on prefill and chunked batches
# (prefill_shrink's fixed gate_up layout takes that default; run 26 predates that layout),
# then the prefill cases with the default and the R=16 chunk/depth alternatives. Binaries as
# in gpu_run.sh, in devbin/:
#   run(command="bash runtime/scripts/gpu_blocked_default.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
echo "== CUDA tests =="
timeout 260 devbin/kernels cuda_bf16::prefill_shrink cuda_bf16::chunked_prefill cuda_bf16::segmented_shrink > "$OUT/cuda_tests.log" 2>&1
echo "rc=$?"
grep -E "^test .*(ok|FAILED)$|test result|panicked" "$OUT/cuda_tests.log" | head -8
echo "== prefill cases =="
timeout 300 devbin/lora_bench --prefill-only --variant "w1x1 k128 g4 s3,w1x1 k128 g2 s3,w1x1 k64 g2 s3" --csv "$OUT/prefill.csv" > /dev/null 2> "$OUT/prefill.err"
echo "rc=$?"
grep -v "^#" "$OUT/prefill.csv" | cut -d, -f1-5,11 | grep -E "segmented|default|fused|pairs" | head -30
