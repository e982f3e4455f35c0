#!/usr/bin/env bash
# Runs on the device machine: the expands read each tile's token rows (batch metadata) before
# their grid dependency point, and the CUDA-core expand issues y's loads before the
# intermediate's, so that after the wait y and the intermediate are one round trip away (run
# 89 found lorac's T = 128 expands 1.5-9 µs slower than a Triton expand that issues its loads
# together). Needs devbin/kernels, devbin/executor_cuda, devbin/lora_bench of the change and
# devbin/prev/lora_bench of the commit before it.
#   PART=1: CUDA tests of the expands and the graph chain, the executor; A/B at T = 128 and 32.
#   PART=2: after run 90 (the CUDA-core expand's y loads moved before the intermediate's made
#           plainly launched 4-token pairs up to 5% slower), a build whose CUDA-core expand
#           loads y after staging the intermediate again (token rows still read before the
#           wait): its CUDA-core expand and chain tests, then A/B at T = 128 and 32, round 2
#           (run 91).
# Kept: the tensor-core expand's change (identical in both builds). The CUDA-core expand's
# changed pairs by -4% to +3.5% without a pattern over the two rounds and was not kept.
#   run(command="PART=1 bash runtime/scripts/gpu_token_rows.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
for f in devbin/*.xz devbin/prev/*.xz; do [ -e "${f%.xz}" ] || xz -dk "$f"; done
if [ "${PART:-1}" = 1 ]; then
    cuda_tests_with_executor 240 cuda_graph_decode_chain_f32 cuda_graph_decode_chain_bf16 cuda_graph_decode_bf16 \
        cuda_bf16::segmented_expand cuda_f32::segmented_expand cuda_bf16::prefill_expand cuda_bf16::split_k_shrink
    ab_round 128 1 150
    ab_round 32 1 130
else
    run_cuda_tests 120 cuda_graph_decode_chain_f32 cuda_graph_decode_chain_bf16 cuda_bf16::segmented_expand cuda_f32::segmented_expand
    (cd "$OUT" && { for f in cuda_*.log; do echo "== $f"; cat "$f"; done > tests.txt; rm -f cuda_*.log; })
    ab_round 128 2 150
    ab_round 32 2 130
fi
compare_ab
(cd "$OUT" && tar czf bench.tgz t*.csv t*.err && rm -f t*.csv t*.err)
