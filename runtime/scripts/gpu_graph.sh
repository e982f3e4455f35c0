#!/usr/bin/env bash
# Run 38 (2026-11-23): CUDA graphs of recorded cubecl launches (lorac_runtime::cuda_graph).
# The CUDA graph tests (shrink+expand and fused, replayed twice, f32 and bf16), then every
# dense decode case (T = 1 to 128) timed through cubecl launches and replayed from graphs.
#   run(command="bash runtime/scripts/gpu_graph.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
run_cuda_tests 150 cuda_graph_decode_f32 cuda_graph_decode_bf16
run_bench 400 graph "$(dense_decode_cases)"
