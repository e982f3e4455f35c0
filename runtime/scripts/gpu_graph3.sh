#!/usr/bin/env bash
# Run 41 (2026-11-23): the CUDA-core shrink's new tiling choices (no 8x8 token tiles on
# decode-sized segments; up to 512 threads for long K). CUDA tests of the shrink, fused and
# graph paths, then an A/B of the affected decode cases against the run-38 binaries
# (devbin/prev/), alternating, two rounds.
#   run(command="bash runtime/scripts/gpu_graph3.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
run_cuda_tests 150 cuda_bf16::segmented_shrink cuda_f32::segmented_shrink cuda_bf16::fused_decode cuda_f32::fused_decode \
    cuda_graph_decode_bf16 cuda_bf16::moe
cases="^qkv R=16 T=128 ,^qkv R=64 T=128 ,^gate_up R=64 T=128 ,^mla_qkv_a R=16 T=128 ,^mla_qkv_a R=64 ,^mla_qkv_a R=16 T=32 "
# (The previous binaries have no "pdl" rows.)
run_ab 120 "" "$cases" 1 2 | grep -v "fused\|per pair\|pdl"
# The device tool returns only a few files: fold the logs together.
cd "$OUT" && {
    for f in cuda_*.log; do echo "== $f"; cat "$f"; done > tests.txt
    for f in prev1 new1 prev2 new2; do echo "== $f"; cat "$f.csv"; done > ab.txt
    for f in *.err; do echo "== $f"; cat "$f"; done > bench_err.txt
    rm -f cuda_*.log prev?.csv new?.csv ./*.err
}
