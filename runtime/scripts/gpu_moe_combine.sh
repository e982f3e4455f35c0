#!/usr/bin/env bash
# Run 30 (2026-11-23): the grouped router-weighted MoE down expand (pair scratch + weighted
# combine) and the device grouping with shared-memory counts, on CUDA, then every MoE case.
#   run(command="bash runtime/scripts/gpu_moe_combine.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
echo "== CUDA tests (one process each) =="
run_cuda_tests 200 cuda_bf16::moe cuda_f32::moe cuda_bf16::moe_grouped cuda_f32::moe_grouped
echo "== MoE cases =="
run_bench 360 moe moe
