#!/usr/bin/env bash
# Runs 51-53 (2026-11-23): the tensor-core decode shrink with K split across cubes, whose partial
# copies the CUDA-core expand sums. PART=1: the CUDA tests of the new kernels and of those whose
# helpers changed (tensor-core shrink tiles, expand, chunked, grouped MoE, graphs), then the
# split-K sweep on the 8-adapter decode cases at T = 32 (run 51); PART=2: the sweep with 8 and
# 16 K groups and a pair per split count, at T = 8, 32 and 128 (run 52); PART=3 (run 53): the
# f32 prefill shrink test (it ran past run 51's limit beside the others) and the split-K tests
# of the automatic choice, then the rank-64 decode cases at T = 32 and 128 with both adapter
# counts, where that choice takes the split-K pair ("graph splitk default").
#   run(command="PART=1 bash runtime/scripts/gpu_splitk.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
if [ "${PART:-1}" = 1 ]; then
    tests=(cuda_graph_decode_bf16)
    for d in f32 bf16; do
        for t in split_k_shrink prefill_shrink segmented_expand chunked_prefill moe_grouped; do tests+=("cuda_$d::$t"); done
    done
    run_cuda_tests 290 "${tests[@]}"
    run_bench 280 splitk_t32 "$(dense_decode_cases_8 32)" --split-k
elif [ "$PART" = 2 ]; then
    for t in 8 32 128; do run_bench 190 "splitk_t$t" "$(dense_decode_cases_8 $t)" --split-k | grep -E ",graph,|splitk pair"; done
else
    run_cuda_tests 400 cuda_f32::prefill_shrink cuda_f32::split_k_shrink cuda_bf16::split_k_shrink
    cases=""
    for m in qkv gate_up mla_qkv_a; do
        for t in 32 128; do cases="$cases,^$m R=64 T=$t "; done
    done
    run_bench 200 default_r64 "${cases#,}" | grep -E ",graph,|splitk default"
fi
cd "$OUT" && {
    cat ./*.err > "bench_err${PART:-1}.txt"
    for f in cuda_*.log; do [ -e "$f" ] && { echo "== $f"; cat "$f"; }; done > tests.txt
    rm -f ./*.err cuda_*.log
    [ -s tests.txt ] || rm -f tests.txt
}
