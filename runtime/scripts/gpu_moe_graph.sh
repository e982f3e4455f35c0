#!/usr/bin/env bash
# Run 60 (2026-11-24): the MoE LoRA cases at T = 1024 (64 experts, top-8, 8 adapters), timed
# through cubecl launches and replayed from CUDA graphs (per pair, grouped on the host, grouped
# on the device with its grouping launches), as the dense prefill cases in run 59.
#   run(command="bash runtime/scripts/gpu_moe_graph.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
run_bench 560 moe_graph "T=1024 adapters"
cd "$OUT" && { cat ./*.err > bench_err.txt; rm -f ./*.err; }
