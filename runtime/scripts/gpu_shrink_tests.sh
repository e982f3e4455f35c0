#!/usr/bin/env bash
# Run 45 (2026-11-23): the CUDA shrink tests with the final kernels (8fbb4f5 + the 128/256-thread
# tiling cases): the 128-thread decode shrink on tensor-core-free CUDA-core paths.
#   run(command="bash runtime/scripts/gpu_shrink_tests.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
run_cuda_tests 150 cuda_bf16::segmented_shrink cuda_f32::segmented_shrink cuda_graph_decode_bf16 cuda_bf16::fused_decode
cd "$OUT" && { for f in cuda_*.log; do echo "== $f"; cat "$f"; done > tests.txt; rm -f cuda_*.log; }
