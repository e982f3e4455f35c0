#!/usr/bin/env bash
# Run 68 (2026-11-24): the tensor-core expand as the default from 8-token segments
# (`MmaExpandConfig::for_decode`). PART=1: CUDA tests of every path whose default expand changes
# (segmented expand, graphs with and without PDL, the PDL chain, split-K copies, embedding, MoE,
# chunked prefill) and the executor's CUDA tests against the HF + PEFT references (bf16 prefill
# segments now expand on tensor cores); PART=2 and PART=3: A/B rounds 1 and 2. The A/B times
# every dense decode case with segments of 8 or more tokens, devbin/prev/lora_bench (6c47d67,
# the CUDA-core default) against devbin/lora_bench, alternating.
#   run(command="PART=1 bash runtime/scripts/gpu_decode_mma_default.sh", carry=["devbin"])
#   run(command="PART=2 bash runtime/scripts/gpu_decode_mma_default.sh", carry=["devbin"])   (and PART=3)
source "$(dirname "$0")/gpu_env.sh"
for f in devbin/*.xz devbin/prev/*.xz; do [ -e "${f%.xz}" ] || xz -dk "$f"; done
cases=""
for m in qkv gate_up mla_qkv_a; do
    for r in 16 64; do
        cases="$cases,^$m R=$r T=8 adapters=1,^$m R=$r T=32 adapters=1,^$m R=$r T=128 "
    done
done
cases=${cases#,}
if [ "${PART:-1}" = 1 ]; then
    run_cuda_tests 280 cuda_bf16::segmented_expand cuda_graph_decode_bf16 cuda_graph_decode_f32 cuda_graph_decode_chain_bf16 \
        cuda_graph_decode_chain_f32 cuda_bf16::split_k_shrink cuda_bf16::embedding cuda_bf16::moe cuda_bf16::moe_grouped cuda_bf16::chunked_prefill
    LORAC_TINY_FIXTURES=tests/fixtures/tiny timeout 200 devbin/executor_cuda --test-threads 1 --nocapture > "$OUT/executor_cuda.log" 2>&1
    echo "executor_cuda rc=$?"
    grep -E "^test |test result|panicked|worst" "$OUT/executor_cuda.log" | head -40
    { for f in "$OUT"/cuda_*.log; do echo "== $f"; cat "$f"; done > "$OUT/tests.txt"; rm -f "$OUT"/cuda_*.log; }
else
    run_ab 250 ab "$cases" "$((PART - 1))" | grep "graph\(,\| pdl,\)"
fi
