#!/usr/bin/env bash
# Run 31 (2026-11-23): the combine kernel with its topk rows loaded before any is cleared
# (run 30's loop made each load wait on the store before it), on CUDA, then the MoE down cases
# at T = 128 and 1024 (the per-pair down beside them: same expand, no combine).
#   run(command="bash runtime/scripts/gpu_moe_combine2.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
echo "== CUDA tests (one process each) =="
run_cuda_tests 200 cuda_bf16::moe cuda_bf16::moe_grouped cuda_f32::moe_grouped
echo "== MoE down cases =="
cases="moe_down R=16 T=128,moe_down R=64 T=128,moe_down R=16 T=1024,moe_down R=64 T=1024"
cases="$cases,moe_down_per_pair R=16 T=1024,moe_down_per_pair R=64 T=1024"
run_bench 300 moe_down "$cases"
