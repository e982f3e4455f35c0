#!/usr/bin/env bash
# Runs on the device machine: at T = 32 (4-token segments), the programmatic split-K shrink
# paired with the tensor-core expand tiles ("splitk pair mma nN", `--decode-mma-expand`)
# against the CUDA-core expand the default takes below 8-token segments; two rounds.
#   run(command="bash runtime/scripts/gpu_mma_expand_t32.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
for f in devbin/*.xz; do [ -e "${f%.xz}" ] || xz -dk "$f"; done
cases="^qkv R=16 T=32 adapters=8,^qkv R=64 T=32 adapters=8,^gate_up R=16 T=32 adapters=8,^gate_up R=64 T=32 adapters=8"
cases="$cases,^mla_qkv_a R=16 T=32 adapters=8,^mla_qkv_a R=64 T=32 adapters=8"
for round in 1 2; do
  run_bench 200 "t32_mma$round" "$cases" --decode-mma-expand | grep -E "rc=|splitk.*pdl$"
done
