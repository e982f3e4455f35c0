#!/usr/bin/env bash
# Run 47 (2026-11-23): decode kernels that group their loads by what they wait on (shrink: three
# dependent memory round trips before its sums instead of five; expand: y, intermediate and B
# loads issued together after two). PART=1: the CUDA tests of every kernel that changed, then
# A/B round 1 against the previous binaries (635978a, devbin/prev/); PART=2: round 2 (not run:
# round 1 dropped the change). The new binaries were built from an uncommitted change to
# shrink.rs, expand.rs and fused.rs, described in runtime/BENCHMARKS.md (runs 47-50).
#   run(command="PART=1 bash runtime/scripts/gpu_latency.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
cases=$(dense_decode_cases_8 1 8 32 128)
if [ "${PART:-1}" = 1 ]; then
    tests=(cuda_graph_decode_f32 cuda_graph_decode_bf16)
    for d in f32 bf16; do
        for t in segmented_shrink segmented_expand fused_decode moe_grouped chunked_prefill; do tests+=("cuda_$d::$t"); done
    done
    run_cuda_tests 200 "${tests[@]}"
    rounds=1
else
    rounds=2
fi
run_ab 140 "" "$cases" "$rounds" | grep -E ",graph,"
cd "$OUT" && {
    for f in prev$rounds new$rounds; do echo "== $f"; cat "$f.csv"; done > "ab$rounds.txt"
    cat ./*.err > "bench_err$rounds.txt"
    for f in cuda_*.log; do [ -e "$f" ] && { echo "== $f"; cat "$f"; }; done > tests.txt
    rm -f prev?.csv new?.csv ./*.err cuda_*.log
    [ -s tests.txt ] || rm -f tests.txt
}
