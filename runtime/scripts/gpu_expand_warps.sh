#!/usr/bin/env bash
# Runs on the device machine (run 109): the prefill tensor-core expand with several fragments
# per warp. That build was not kept (slower; its patch is
# runtime/benchmarks/h100-2026-11-24-kernels-run108-113-expand/run109_warp_columns.patch);
# with the current binaries the sweep has one fragment per warp.
#   PART=1: CUDA tests prefill_expand (bf16 on tensor cores, f32 emulated), then `lora_bench --expand-splits`
#           on CASES (default the rank-64 qkv and MLA prefill cases).
#   PART=2: only the sweep, on CASES.
#   run(command="PART=1 bash runtime/scripts/gpu_expand_warps.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
for f in devbin/*.xz; do [ -e "${f%.xz}" ] || xz -dk "$f"; done
PART=${PART:-1}
if [ "$PART" = 1 ]; then
  run_cuda_tests 200 cuda_bf16::prefill_expand cuda_f32::prefill_expand
  (cd "$OUT" && { for f in cuda_*.log; do echo "== $f"; cat "$f"; done > tests.txt; rm -f cuda_*.log; })
fi
CASES=${CASES:-"qkv R=64,mla_qkv_a R=64"} LIMIT=$(( 575 - SECONDS )) bash "$(dirname "$0")/gpu_expand_splits.sh"
