#!/usr/bin/env bash
# Run 34 (2026-11-23): the reworked decode kernels (CUDA-core expand staging its B block with
# coalesced loads, CUDA-core shrink pairing K steps) on CUDA, then the decode cases timed with
# the new binaries and with the previous ones (devbin/old/, built at 381c54c: same decode
# kernels as runs 9-33) in the same run, alternating.
#   run(command="bash runtime/scripts/gpu_decode.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
echo "== CUDA tests (one process each) =="
run_cuda_tests 240 cuda_bf16::segmented_expand cuda_f32::segmented_expand cuda_bf16::segmented_shrink \
    cuda_f32::segmented_shrink cuda_bf16::fused_decode cuda_f32::fused_decode cuda_bf16::chunked_prefill \
    cuda_bf16::moe cuda_bf16::gemm_expand
cases="T=1 adapters,T=8 adapters,T=32 adapters,T=128 adapters"
for round in 1 2; do
    echo "== decode, new kernels, round $round =="
    run_bench 150 "decode_new_$round" "$cases"
    echo "== decode, previous kernels, round $round =="
    LORA_BENCH=devbin/old/lora_bench run_bench 150 "decode_old_$round" "$cases"
done
