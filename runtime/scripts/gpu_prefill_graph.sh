#!/usr/bin/env bash
# Run 59 (2026-11-24): every dense prefill case (T = 4096, 8 adapters) with its default kernels,
# timed both ways: back-to-back cubecl launches ("segmented", as before) and replayed from CUDA
# graphs ("graph": a graph of every rotation set's pair; "graph per pair"; "graph pdl"), so the
# host's launch cost shows; two rounds.
#   run(command="bash runtime/scripts/gpu_prefill_graph.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
for round in 1 2; do
    run_bench 280 "prefill_graph$round" "^qkv R=16 T=4096,^qkv R=64 T=4096,^gate_up R=16 T=4096,^gate_up R=64 T=4096,^mla_qkv_a R=16 T=4096,^mla_qkv_a R=64 T=4096" \
        --prefill-only --variant none
done
cd "$OUT" && { cat ./*.err > bench_err.txt; rm -f ./*.err; }
