#!/usr/bin/env bash
# Runs 62–65 (2026-11-24): programmatic dependent launch with prefetch. The decode shrink loads A
# and the decode expand stages B before their grid dependency points (the wait for the kernel
# before). CUDA tests of the changed kernels (graph tests with PDL, the two-layer chain through
# y), then dense decode cases, two rounds: "graph" against "graph pdl" (and, since run 63,
# "graph pdl carveout"; the kernels' grids, registers and occupancy in $OUT/pdlN.err).
# Run 62: 8 adapters, T = 8 to 128; run 63: ALL=1, every decode case, tests skipped (SKIP_TESTS=1);
# run 64: the shrink waits once per thread, not at every call of its dot products: ALL=1 ROUNDS=1
# (its chain test failed); run 65: pointers without __restrict__ under PDL, ALL=1 ROUNDS=1 REPEAT=3
# (the chain tests three times over).
#   run(command="bash runtime/scripts/gpu_pdl_prefetch.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
for i in $(seq 2 "${REPEAT:-1}"); do
    [ -n "${SKIP_TESTS:-}" ] || run_cuda_tests 100 cuda_graph_decode_chain_f32 cuda_graph_decode_chain_bf16
done
[ -n "${SKIP_TESTS:-}" ] || run_cuda_tests 200 cuda_graph_decode_f32 cuda_graph_decode_bf16 cuda_graph_decode_chain_f32 cuda_graph_decode_chain_bf16 \
    cuda_bf16::segmented_shrink cuda_f32::segmented_shrink cuda_bf16::segmented_expand cuda_bf16::fused_decode cuda_bf16::moe
for round in $(seq 1 "${ROUNDS:-2}"); do
    if [ -n "${ALL:-}" ]; then cases=$(dense_decode_cases); else cases=$(dense_decode_cases_8 8 32 128); fi
    run_bench 280 "pdl$round" "$cases" | grep "graph\(,\| pdl\)"
done
grep " cubes " "$OUT/pdl1.err" | sort -u
cd "$OUT" && [ -n "${SKIP_TESTS:-}" ] || { for f in cuda_*.log; do echo "== $f"; cat "$f"; done > tests.txt; rm -f cuda_*.log; }
