#!/usr/bin/env bash
# Run 40 (2026-11-23): the CUDA-core decode kernels' tilings, each timed from a CUDA graph
# (lora_bench --decode-sweep), on the decode cases furthest from the goals.
#   run(command="bash runtime/scripts/gpu_decode_sweep.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
run_bench 480 sweep "^qkv R=16 T=32 adapters=8,^qkv R=64 T=8 adapters=8,^qkv R=64 T=32 adapters=8,^mla_qkv_a R=64 T=32 adapters=8,^gate_up R=64 T=32 adapters=8,^qkv R=64 T=128 adapters=8" \
    --decode-sweep
