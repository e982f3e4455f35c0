#!/usr/bin/env bash
# Runs on the device machine: at T = 128 (16-token segments, 8 adapters), the split-K shrink's
# pair with the tensor-core expand summing its copies on 16 × 32, 16 × 64 and 16 × 128 tiles
# ("splitk pair mma nN", n2/n4/n8), against the default (n8, the widest). Run 89 found the
# MLA expand (n8: 136 cubes on 132 multiprocessors) 34% slower than a Triton expand of
# 64-column blocks. Two rounds of devbin/lora_bench --decode-mma-expand.
#   run(command="bash runtime/scripts/gpu_expand_tiles.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
for f in devbin/*.xz; do [ -e "${f%.xz}" ] || xz -dk "$f"; done
cases=$(dense_decode_cases_8 128)
for round in 1 2; do
    run_bench 200 "tiles$round" "$cases" --decode-mma-expand --variant "mma expand" > /dev/null
    echo "round $round done"
done
for round in 1 2; do
    echo "== round $round"
    grep -v "^#" "$OUT/tiles$round.csv" | grep -E "splitk" | cut -d, -f1-5,11
done
