#!/usr/bin/env bash
# Runs 51-52 (2026-11-24): the tensor-core decode shrink with K split across cubes, whose partial
# copies the CUDA-core expand sums. PART=1: the CUDA tests of the new kernels and of those whose
# helpers changed (tensor-core shrink tiles, expand, chunked, grouped MoE, graphs), then the
# split-K sweep on the 8-adapter decode cases at T = 32; PART=2: the sweep at T = 8 and 128.
#   run(command="PART=1 bash runtime/scripts/gpu_splitk.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
if [ "${PART:-1}" = 1 ]; then
    tests=(cuda_graph_decode_bf16)
    for d in f32 bf16; do
        for t in split_k_shrink prefill_shrink segmented_expand chunked_prefill moe_grouped; do tests+=("cuda_$d::$t"); done
    done
    run_cuda_tests 290 "${tests[@]}"
    run_bench 280 splitk_t32 "$(dense_decode_cases_8 32)" --split-k
else
    run_bench 290 splitk_t8 "$(dense_decode_cases_8 8)" --split-k
    run_bench 290 splitk_t128 "$(dense_decode_cases_8 128)" --split-k
fi
cd "$OUT" && {
    cat ./*.err > "bench_err${PART:-1}.txt"
    for f in cuda_*.log; do [ -e "$f" ] && { echo "== $f"; cat "$f"; }; done > tests.txt
    rm -f ./*.err cuda_*.log
    [ -s tests.txt ] || rm -f tests.txt
}
