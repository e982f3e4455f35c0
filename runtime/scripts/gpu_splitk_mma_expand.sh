#!/usr/bin/env bash
# Run 69 (2026-11-24): the split-K tensor-core shrink ("graph splitk default", chosen for a caller
# with room for its copies: rank 64, T = 128) paired with the default expand summing its copies,
# which is now the register-staged tensor-core one (16-token segments), plain and under PDL.
# A/B, two rounds alternating: devbin/prev/lora_bench (6c47d67: the CUDA-core expand sums the
# copies) against devbin/lora_bench.
#   run(command="bash runtime/scripts/gpu_splitk_mma_expand.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
for f in devbin/*.xz devbin/prev/*.xz; do [ -e "${f%.xz}" ] || xz -dk "$f"; done
run_ab 200 sk "^qkv R=64 T=128 ,^gate_up R=64 T=128 ,^mla_qkv_a R=64 T=128 " 1 2 | grep "graph\(,\| pdl,\| splitk\)"
