#!/usr/bin/env bash
# Runs on the device machine: the whole split-K shrink sweep (2-32 splits, every tile and
# stage count lora_bench --split-k knows) for the two cases where run 89's Triton pair beat
# lorac's by 13%: qkv and MLA at rank 64, T = 32, 8 adapters (4-token segments). For each split
# count the fastest shrink is paired with the CUDA-core expand summing its copies and with the
# default one (plain and under PDL). Measurement only, for the next change.
#   run(command="bash runtime/scripts/gpu_split_k_t32_r64.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
for f in devbin/*.xz; do [ -e "${f%.xz}" ] || xz -dk "$f"; done
run_bench 280 qkv64_t32 "^qkv R=64 T=32 adapters=8" --split-k > /dev/null
echo "qkv done"
run_bench 280 mla64_t32 "^mla_qkv_a R=64 T=32 adapters=8" --split-k > /dev/null
echo "mla done"
for f in qkv64_t32 mla64_t32; do
    echo "== $f: the 8 fastest shrinks alone, then every pair"
    grep -v "^#" "$OUT/$f.csv" | grep "splitk n" | sort -t, -k3 -n | head -8 | cut -d, -f2,3
    grep -v "^#" "$OUT/$f.csv" | grep -E "splitk pair|graph" | cut -d, -f2-5,11
done
