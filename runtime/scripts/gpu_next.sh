#!/usr/bin/env bash
# The pending GPU run after 2026-11-23 (runs 23-27): the CUDA checks of the code that has not
# run on tensor cores yet, then the MoE cases with the grouped path beside the per-pair one.
#  1. cuda_bf16::prefill_shrink: its fixed gate_up layout takes the 2×4 warp-block default
#     (run 26 predates that layout, so that default was timed but not checked);
#  2. moe and moe_grouped (bf16 and f32): the grouped MoE path (pairs sorted by slot and
#     expert through the dense kernels, tensor-core tiles included);
#  3. lora_bench on every MoE case (decode and T = 1024; rows "pairs", "grouped" and "grouped
#     on device", the last with the grouping launches in its pair time).
# Binaries as in gpu_run.sh, in devbin/:
#   run(command="bash runtime/scripts/gpu_next.sh", carry=["devbin"])
# Then, in a second call, the 16-token shrink tiles the sweep gained (MLA at T = 4096 fills
# only 128 cubes with 32-token tiles):
#   devbin/lora_bench --prefill-only --case "mla_qkv_a R=16 T=4096" --variant "m1 n2,m2 n2 w1x1 k128"
source "$(dirname "$0")/gpu_env.sh"
echo "== CUDA tests (one process each) =="
run_cuda_tests 280 cuda_bf16::prefill_shrink cuda_bf16::moe cuda_bf16::moe_grouped cuda_f32::moe_grouped cuda_bf16::chunked_prefill
echo "== MoE cases =="
run_bench 280 moe moe
