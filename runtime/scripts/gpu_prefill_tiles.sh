#!/usr/bin/env bash
# Runs on the device machine: `lora_bench --prefill-tiles` (prefill shrink tiles of 64 and
# 128 tokens up to every A row with 1/2/4 K splits, expand tiles of 128-192 columns, pairs;
# from CUDA graphs) on the rank-64 qkv and MLA prefill cases.
#   run 101: VARIANTS= (every tile; qkv R=64 ran out of its 220 s)
#   run 102: the default and the fastest shrinks of run 101, every expand tile, pairs
#   run 107: VARIANTS="m4 n12 w2x4 g2 k64 s3 x2,m4 n8 w2x4 g2 k64 s3 x2,tiles expand m1 n8 s2,tiles expand m2 n8 s2"
#   run(command="bash runtime/scripts/gpu_prefill_tiles.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
for f in devbin/*.xz; do [ -e "${f%.xz}" ] || xz -dk "$f"; done
VARIANTS=${VARIANTS-"m4 n4 w2x4 g2 k64 s3 x1,m4 n12 w2x4 g2 k64 s3 x2,m4 n12 w2x4 g2 k64 s3 x4,m8 n6 w4x3 g2 k64 s3 x2,m4 n8 w4x4 g2 k64 s3 x2,m8 n8 w4x4 g2 k64 s2 x4,tiles expand"}
start=$(date +%s)
for c in "qkv R=64" "mla_qkv_a R=64"; do
  left=$(( 570 - ($(date +%s) - start) ))
  [ "$left" -gt 60 ] || break
  name="tiles_$(echo "$c" | tr ' =' '__')"
  echo "== $c ($left s left)"
  run_bench "$(( left < 280 ? left : 280 ))" "$name" "^$c T=4096 adapters=8" --prefill-tiles ${VARIANTS:+--variant "$VARIANTS"} | grep -E "rc=|graph|tiles pair"
  grep "tiles shrink\|tiles expand" "$OUT/$name.csv" | cut -d, -f2-4
done
