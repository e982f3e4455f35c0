#!/usr/bin/env bash
# Runs on the device machine (lora_bench in devbin/): the split-K sweep (`--split-k`) of the
# rank-64 T = 128 decode cases, each split count's fastest shrink paired with the CUDA-core and
# with the default (tensor-core) summing expand: does a split count other than
# SPLIT_K_COPIES (4) make a faster pair now that the expand sums on tensor cores?
source "$(dirname "$0")/gpu_env.sh"
for f in devbin/*.xz; do [ -e "${f%.xz}" ] || xz -dk "$f"; done
run_bench 500 splitk_counts "^qkv R=64 T=128 adapters=8,^gate_up R=64 T=128 adapters=8,^mla_qkv_a R=64 T=128 adapters=8" --split-k \
    | grep "graph\(,\| pdl,\| splitk default\|.*splitk pair\)"
