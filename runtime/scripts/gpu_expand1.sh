#!/usr/bin/env bash
# Run 50 (2026-11-23): the CUDA-core expand on single-token tiles issues its B, y and
# intermediate loads together (and every expand loads the segment range with the slot, the
# scale with the rank). A/B against the previous binaries (635978a, devbin/prev/), alternating,
# two rounds, every dense decode case with 8 adapters, from graphs. PART=tests: the CUDA tests
# (not run: the A/B dropped the change). The new binary had all of runtime/benchmarks/h100-2026-11-23-kernels-run47-50-latency/run49-50_carveout_and_single_token_expand.patch
# applied to b9a6db2 (the expand half is this change).
#   run(command="bash runtime/scripts/gpu_expand1.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
if [ "${PART:-bench}" = tests ]; then
    tests=(cuda_graph_decode_f32 cuda_graph_decode_bf16)
    for d in f32 bf16; do
        for t in segmented_expand fused_decode moe_grouped chunked_prefill prefill_expand; do tests+=("cuda_$d::$t"); done
    done
    run_cuda_tests 200 "${tests[@]}"
    cd "$OUT" && { for f in cuda_*.log; do echo "== $f"; cat "$f"; done > tests.txt; rm -f cuda_*.log; }
    exit 0
fi
cases=$(dense_decode_cases_8 8 32 128)
run_ab 140 "" "$cases" 1 2 | grep -E ",graph,"
cd "$OUT" && { for f in prev1 new1 prev2 new2; do echo "== $f"; cat "$f.csv"; done > ab.txt; cat ./*.err > bench_err.txt; rm -f prev?.csv new?.csv ./*.err; }
