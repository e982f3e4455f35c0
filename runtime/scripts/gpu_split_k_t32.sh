#!/usr/bin/env bash
# Run 82 (2026-11-24): should batches of 4-token segments (T = 32, 8 adapters) split K too?
# Their default stays on the CUDA-core shrink and expand (`split_k_for` wants 16-token
# segments; runs 52-53 found the copies too costly with the CUDA-core summing expand). In one
# binary (lora_bench at f077cff), two rounds: the default rows ("graph", "graph pdl") against the
# split-K pair with the default 4-stage tile ("splitk pair default ... pdl"), rank 16 and 64.
#   run(command="bash runtime/scripts/gpu_split_k_t32.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
for f in devbin/*.xz; do [ -e "${f%.xz}" ] || xz -dk "$f"; done
cases=$(dense_decode_cases_8 32)
for round in 1 2; do
    run_bench 250 "t32_$round" "$cases" --split-k --variant "splitk n1 g4 k128 s4 st4" | grep -E ",graph,|,graph pdl,|splitk pair default"
done
