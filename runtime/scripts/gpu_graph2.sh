#!/usr/bin/env bash
# Run 39 (2026-11-23): CUDA graphs with programmatic dependent launch, the decode expand with
# y's loads ahead of the B staging. CUDA tests (graphs plain and programmatic, f32 and bf16;
# the expand paths), every dense decode case with the new binaries, MoE decode graphs, then
# an A/B of four decode cases against the run-38 binaries (devbin/prev/), alternating.
#   run(command="bash runtime/scripts/gpu_graph2.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
run_cuda_tests 150 cuda_graph_decode_f32 cuda_graph_decode_bf16 cuda_bf16::segmented_expand cuda_f32::segmented_expand \
    cuda_bf16::chunked_prefill cuda_bf16::embedding cuda_bf16::fused_decode
run_bench 300 graph "$(dense_decode_cases)"
run_bench 100 moe "^moe_gate_up R=64 T=8 ,^moe_down R=64 T=32 ,^moe_down R=16 T=8 "
ab="qkv R=16 T=32 adapters=8,qkv R=64 T=8 adapters=8,gate_up R=64 T=32 adapters=8,mla_qkv_a R=64 T=32 adapters=8"
run_ab 60 ab_ "$ab" 1 2 | grep -v "fused\|per pair"
# The device tool returns only a few files: fold the logs together. (Run 39 wrote ab_moe.csv,
# which the rm below then deleted; its tables are in run39_ab_moe_stdout.txt.)
cd "$OUT" && {
    for f in cuda_*.log; do echo "== $f"; cat "$f"; done > tests.txt
    for f in ab_*.csv moe.csv; do echo "== $f"; cat "$f"; done > ab_moe.txt
    for f in *.err; do echo "== $f"; cat "$f"; done > bench_err.txt
    rm -f cuda_*.log ab_*.csv moe.csv ./*.err
}
