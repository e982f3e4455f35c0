#!/usr/bin/env bash
# Run 66 (2026-11-24): CUDA tests after the MoE device grouping's dense kernels lost their grid
# dependency point (segments a kernel wrote are read only after the wait).
#   run(command="bash runtime/scripts/gpu_pdl_tests.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
run_cuda_tests 200 cuda_graph_decode_f32 cuda_graph_decode_bf16 cuda_graph_decode_chain_f32 cuda_graph_decode_chain_bf16 \
    cuda_bf16::segmented_shrink cuda_bf16::segmented_expand cuda_bf16::moe_grouped cuda_f32::moe_grouped cuda_bf16::chunked_prefill
cd "$OUT" && { for f in cuda_*.log; do echo "== $f"; cat "$f"; done > tests.txt; rm -f cuda_*.log; }
