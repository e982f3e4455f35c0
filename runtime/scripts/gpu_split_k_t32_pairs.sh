#!/usr/bin/env bash
# Runs on the device machine: after run 94, the pairs of the split-K shrink tiles that were
# fastest alone on qkv R=64 T=32 ("n1 g8 k128 s8", "n1 g16 k256 s4") against the default tile
# ("n1 g4 k128 s4 st4"), plain and under PDL, on the T = 32, 8-adapter cases of qkv (R=16,
# R=64) and gate_up R=64 (which the programmatic choice made 4% slower in run 93), two rounds.
#   run(command="bash runtime/scripts/gpu_split_k_t32_pairs.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
for f in devbin/*.xz; do [ -e "${f%.xz}" ] || xz -dk "$f"; done
cases="^qkv R=64 T=32 adapters=8,^qkv R=16 T=32 adapters=8,^gate_up R=64 T=32 adapters=8"
for round in 1 2; do
    run_bench 250 "pairs$round" "$cases" --split-k --variant "splitk n1 g8 k128 s8,splitk n1 g16 k256 s4,splitk n1 g4 k128 s4 st4" \
        | grep -E "rc=|pair default.*pdl$|graph pdl,|pdl-choice.*pdl$|splitk n1"
done
