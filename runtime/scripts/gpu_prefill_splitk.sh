#!/usr/bin/env bash
# Runs 54-55 (2026-11-24): prefill with K split across the tensor-core shrink's cubes, the
# tensor-core expand adding up the copies. PART=1 (run 54): the CUDA tests of the split-K prefill
# pair and of the changed tensor-core expand, then the qkv prefill cases with 1-8 splits;
# PART=2 (run 55, after fixing the array lengths cubecl sees, which run 54's pipelined summing
# expand read wrongly): those tests again and the CUDA tests of every kernel family (all take
# their arrays through the changed argument), then the gate_up and MLA prefill cases. PART=3
# (run 56, lora_bench at 866a002): qkv and MLA prefill, shrink tiles of 32-128 tokens with 1-8
# splits. PART=4 (run 58): the same cases, the default tile and compact tiles (at most 56 KiB of
# shared memory) with 1-8 splits.
#   run(command="PART=1 bash runtime/scripts/gpu_prefill_splitk.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
if [ "${PART:-1}" = 1 ]; then
    run_cuda_tests 300 cuda_bf16::split_k_prefill cuda_f32::split_k_prefill cuda_bf16::prefill_expand cuda_f32::prefill_expand \
        cuda_bf16::split_k_shrink cuda_bf16::chunked_prefill
    run_bench 250 prefill_qkv "^qkv R=16 T=4096,^qkv R=64 T=4096" --prefill-only --prefill-split-k --variant splitk
elif [ "$PART" = 3 ] || [ "$PART" = 4 ]; then
    run_bench 560 prefill_tiles "^qkv R=16 T=4096,^qkv R=64 T=4096,^mla_qkv_a R=16 T=4096,^mla_qkv_a R=64 T=4096" \
        --prefill-only --prefill-split-k --variant splitk
else
    tests=(cuda_f32::split_k_prefill)
    for t in split_k_prefill split_k_shrink segmented_shrink segmented_expand fused_decode gemm_expand chunked_prefill embedding moe \
        moe_grouped rejects_bad_input; do tests+=("cuda_bf16::$t"); done
    run_cuda_tests 200 "${tests[@]}"
    run_bench 330 prefill_rest "^gate_up R=16 T=4096,^gate_up R=64 T=4096,^mla_qkv_a R=16 T=4096,^mla_qkv_a R=64 T=4096" \
        --prefill-only --prefill-split-k --variant splitk
fi
cd "$OUT" && {
    cat ./*.err > "bench_err${PART:-1}.txt"
    for f in cuda_*.log; do [ -e "$f" ] && { echo "== $f"; cat "$f"; }; done > tests.txt
    rm -f ./*.err cuda_*.log
    [ -s tests.txt ] || rm -f tests.txt
}
