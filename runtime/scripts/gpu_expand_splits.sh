#!/usr/bin/env bash
# Runs on the device machine: `lora_bench --expand-splits` (the prefill tensor-core expand
# alone from CUDA graphs: 16- and 32-token tiles, 2-4 stages, 1 and 2 copies, each segment's
# tiles shared out over 1-16 cubes and the default split) on the prefill cases in CASES.
#   run(command="CASES='qkv R=64,mla_qkv_a R=64' bash runtime/scripts/gpu_expand_splits.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
for f in devbin/*.xz; do [ -e "${f%.xz}" ] || xz -dk "$f"; done
CASES=${CASES:-"qkv R=64,mla_qkv_a R=64,qkv R=16,mla_qkv_a R=16"}
LIMIT=${LIMIT:-570}
start=$(date +%s)
IFS=, read -ra cases <<< "$CASES"
n=${#cases[@]}
for c in "${cases[@]}"; do
  left=$(( LIMIT - ($(date +%s) - start) ))
  [ "$left" -gt 40 ] || break
  share=$(( left / n )); n=$(( n - 1 ))
  name="splits_$(echo "$c" | tr ' =' '__')"
  echo "== $c ($share s of $left s left)"
  run_bench "$share" "$name" "^$c T=4096 adapters=8" --expand-splits ${VARIANTS:+--variant "$VARIANTS"} | grep -E "rc=|graph"
  grep "expand-splits" "$OUT/$name.csv" | cut -d, -f2,4 | sed 's/expand-splits //'
done
