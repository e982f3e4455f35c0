#!/usr/bin/env bash
# Run 67 (2026-11-24): the register-staged tensor-core expand at decode sizes. CUDA tests of the
# changed kernel (the two-layer PDL chain now expands on tensor cores for half its seeds; the
# prefill expand and grouped MoE tests run the same kernel), then every dense decode case with
# `--decode-mma-expand`: the tensor-core expand alone and paired with the default shrink, plain,
# with programmatic launch and with the carveout, beside the default pair's rows.
#   run(command="PARTS='qkv mla_qkv_a' bash runtime/scripts/gpu_mma_expand.sh", carry=["devbin"])
#   run(command="SKIP_TESTS=1 PARTS=gate_up bash runtime/scripts/gpu_mma_expand.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
[ -n "${SKIP_TESTS:-}" ] || run_cuda_tests 250 cuda_graph_decode_chain_f32 cuda_graph_decode_chain_bf16 cuda_graph_decode_bf16 \
    cuda_bf16::prefill_expand cuda_bf16::segmented_expand cuda_bf16::moe_grouped
cases_for() {
    local cases="" m r t
    for m in "$@"; do
        for r in 16 64; do
            for t in 1 8 32 128; do cases="$cases,^$m R=$r T=$t "; done
        done
    done
    echo "${cases#,}"
}
# One module per lora_bench call (PARTS, default all three; two calls fit the device's 10 minutes).
for part in ${PARTS:-qkv mla_qkv_a gate_up}; do
    run_bench 250 "mma_$part" "$(cases_for "$part")" --decode-mma-expand | grep "graph\(,\| pdl\)\|mma expand"
done
cd "$OUT" && [ -n "${SKIP_TESTS:-}" ] || { for f in cuda_*.log; do echo "== $f"; cat "$f"; done > tests.txt; rm -f cuda_*.log; }
