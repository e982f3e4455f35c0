#!/usr/bin/env bash
# Run 43 (2026-11-23): the decode tilings at T = 128 (lora_bench --decode-sweep from CUDA
# graphs), final binaries (5b3d0ac): does the shrink's 4x4 tile want 128 threads there?
#   run(command="bash runtime/scripts/gpu_sweep128.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
run_bench 300 sweep128 "^qkv R=64 T=128 ,^gate_up R=64 T=128 adapters=8,^mla_qkv_a R=64 T=128 adapters=8,^qkv R=16 T=128 adapters=8" --decode-sweep \
    | grep -E "graph,|sweep shrink"
