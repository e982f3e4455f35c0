#!/usr/bin/env bash
# Runs on the device machine: why the rank-64 prefill shrinks run at ~140 TFLOP/s, and whether
# their staging (chunk width, stages, K groups) is the limit.
#   PART=1 (run 115): Nsight Compute on the default shrink of qkv and MLA R=64 at T = 4096
#     (gpu_expand_profile.sh with KERNEL=shrink_mma; its files packed into profile.tar.xz),
#     then `lora_bench --prefill-tiles` on qkv R=64 over the VARIANTS below.
#   PART=2: the same sweep on MLA R=64.
#   PART=3 (run 117, shrink on ldmatrix fragments): the CUDA shrink tests, then the qkv sweep
#     with the one-K-group tiles (their warps store from registers) in VARIANTS3.
#   PART=4 (run 118): the MLA sweep over VARIANTS3.
#   run(command="PART=1 bash runtime/scripts/gpu_shrink_staging.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
for f in devbin/*.xz; do [ -e "${f%.xz}" ] || xz -dk "$f"; done
PART=${PART:-1}
# The default tiles, the wide tiles (every A row) with 64 and 128 tokens, each in every staging
# the sweep has; the 16-token three-stage expand tile (the default) for the pairs.
VARIANTS=${VARIANTS-"m4 n4 w2x4 g2 k64 s3 x1,m4 n4 w2x4 g2 k128 s3 x1,m4 n4 w2x4 g2 k64 s4 x1,m4 n4 w2x4 g4 k128 s3 x1,m4 n4 w2x4 g4 k64 s4 x1,tiles shrink m4 n12 w2x4,tiles shrink m8 n12 w4x4,tiles shrink m4 n8 w2x4,tiles shrink m8 n8 w4x4,tiles expand m1 n8 s3"}
VARIANTS3="m4 n4 w2x4 g2 k64 s3 x1,tiles shrink m4 n4 w2x2 g1,tiles shrink m4 n12 w2x2 g1,tiles shrink m4 n12 w2x3 g1,tiles shrink m4 n12 w2x4"
VARIANTS3="$VARIANTS3,tiles shrink m8 n12 w4x3 g1,tiles shrink m8 n12 w4x4 g1,tiles shrink m4 n8 w2x2 g1,tiles shrink m4 n8 w2x4"
VARIANTS3="$VARIANTS3,tiles shrink m8 n8 w4x2 g1,tiles shrink m8 n8 w4x4,tiles expand m1 n8 s3"
start=$(date +%s)
if [ "$PART" -ge 3 ]; then
  VARIANTS=$VARIANTS3
  if [ "$PART" = 3 ]; then
    run_cuda_tests 200 cuda_bf16::prefill_shrink cuda_bf16::split_k_prefill cuda_bf16::split_k_shrink
    grep -h -A3 panicked "$OUT"/cuda_*.log | cut -c1-600 | head -20
    (cd "$OUT" && { for f in cuda_*.log; do echo "== $f"; cat "$f"; done > tests.txt; rm -f cuda_*.log summary.txt; })
  fi
  cases="qkv R=64"; [ "$PART" = 4 ] && cases="mla_qkv_a R=64"
elif [ "$PART" = 1 ]; then
  mkdir -p "$OUT/profile"
  OUT="$OUT/profile" KERNEL=shrink_mma bash "$(dirname "$0")/gpu_expand_profile.sh" | grep -v "^ *0.00%"
  (cd "$OUT" && tar cJf profile.tar.xz profile && rm -rf profile)
  cases="qkv R=64"
else
  cases="mla_qkv_a R=64"
fi
left=$(( 575 - ($(date +%s) - start) ))
name="staging_$(echo "$cases" | tr ' =' '__')"
echo "== $cases ($left s left)"
run_bench "$left" "$name" "^$cases T=4096 adapters=8" --prefill-tiles --variant "$VARIANTS" | grep -E "rc=|graph|tiles pair"
grep "tiles shrink\|tiles expand" "$OUT/$name.csv" | cut -d, -f2-4 | sort -t, -k2 -g
