#!/usr/bin/env bash
# Run 46 (2026-11-23): the review pass (635978a): CUDA graph tests and two decode cases through
# the refactored graph timing.
#   run(command="bash runtime/scripts/gpu_review.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
run_cuda_tests 120 cuda_graph_decode_f32 cuda_graph_decode_bf16 cuda_bf16::segmented_shrink
run_bench 120 review "^qkv R=16 T=32 adapters=8,^gate_up R=64 T=8 adapters=8" | grep -v pdl
cd "$OUT" && { for f in cuda_*.log; do echo "== $f"; cat "$f"; done > tests.txt; rm -f cuda_*.log; }
