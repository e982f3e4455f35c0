#!/usr/bin/env bash
# Runs on the device machine: the wide prefill shrink tile with K split in two
# (`MmaShrinkConfig::wide_split_for`, chosen with room for two copies). Needs devbin/kernels,
# devbin/executor_cuda and devbin/lora_bench of the change, devbin/prev/lora_bench before it.
#   PART=1: the CUDA tests (split_k_prefill runs the wide tile in bf16; the executor), then
#           prev against new on the rank-64 prefill cases, round 1 (run 103).
#   PART=2: the same A/B, rounds 2 and 3 (run 104).
#   PART=3: after the rule that keeps qkv and gate_up on the blocked tile, the final binary
#           against prev, one round (run 105).
#   PART=4: the expand summing copies at rank 64 on 16-token tiles (prev: run 105's binary):
#           the CUDA tests, then MLA R=64 prefill, prev against new, rounds 6-8 (run 106).
# The "segmented" and "graph" rows of the new binary use the engine's choice for an
# intermediate sized by `ShrinkKernel::intermediate_len`; the tile sweep is skipped
# (`--prefill-tiles --variant zzz`).
#   run(command="PART=1 bash runtime/scripts/gpu_wide_split.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
for f in devbin/*.xz devbin/prev/*.xz; do [ -e "${f%.xz}" ] || xz -dk "$f"; done
cases="^qkv R=64 T=4096,^mla_qkv_a R=64 T=4096,^gate_up R=64 T=4096"
ab() {
    local round=$1
    LORA_BENCH=devbin/prev/lora_bench run_bench 200 "prev$round" "$cases" --prefill-tiles --variant zzz
    run_bench 200 "new$round" "$cases" --prefill-tiles --variant zzz
}
if [ "${PART:-1}" = 1 ]; then
    cuda_tests_with_executor 240 cuda_bf16::split_k_prefill cuda_f32::split_k_prefill split_k_shrink_follows_the_room
    ab 1
elif [ "$PART" = 2 ]; then
    ab 2
    ab 3
elif [ "$PART" = 3 ]; then
    ab 5
else
    cuda_tests_with_executor 240 cuda_bf16::split_k_prefill cuda_f32::split_k_prefill split_k_shrink_follows_the_room
    cases="^mla_qkv_a R=64 T=4096"
    ab 6
    ab 7
    ab 8
fi
