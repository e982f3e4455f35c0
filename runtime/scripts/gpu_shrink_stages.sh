#!/usr/bin/env bash
# Runs on the device machine (2026-11-25, second session): the by-hand tensor-core shrink with
# several K groups now adds the other groups' partial sums to the first group's registers and
# stores from there, so its accumulator tile holds one group fewer (MLA's tall wide tile: 64
# KiB instead of 128) and the tile has room for three or four stages.
#   PART=1: CUDA tests of every shrink, then --prefill-tiles on MLA R=64 over the 128- and
#           64-token wide tiles at 2-4 stages (new store path) and their pairs.
#   PART=2: --expand-splits on MLA R=64 for the four copies of the tall tile, two and three
#           stages (three reads token rows a tile ahead), and the tall tiles with 128-wide
#           chunks (two stages fit now).
#   PART=3: CUDA test prefill_shrink alone, then the default pair A/B against devbin/prev
#           (two rounds).
#   PART=4: A/B of the other prefill pairs whose shrink has several K groups on `ldmatrix`
#           fragments (qkv R=64's wide tile) or may have (the rank-16 cases), one round.
#   PART=5: A/B of the decode cases at T = 128 and T = 32 (the split-K decode shrinks have
#           four K groups), one round each, with compare_ab.
#   PART=6: after REGISTER_STORE_MIN_FRAGMENTS (decode tiles store through the tile again):
#           CUDA tests of every shrink and the executor.
#   PART=7: A/B of the decode cases at T = 32 and of the rank-64 qkv and MLA prefill pairs.
#   PART=8: --expand-splits on MLA R=64, four copies: the 16 x 256 by-hand tiles (half the
#           intermediate re-reads per y byte) beside the default 16 x 128 one.
#   run(command="PART=1 bash runtime/scripts/gpu_shrink_stages.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
for f in devbin/*.xz devbin/prev/*.xz; do [ -e "${f%.xz}" ] || xz -dk "$f"; done
PART=${PART:-1}
MLA="^mla_qkv_a R=64 T=4096 adapters=8"
if [ "$PART" = 1 ]; then
  cuda_tests_with_executor 300 cuda_bf16::segmented_shrink cuda_bf16::prefill_shrink cuda_bf16::split_k_shrink cuda_bf16::split_k_prefill
  run_bench 330 tiles_mla "$MLA" --prefill-only --prefill-tiles \
    --variant "shrink m8 n8 w4x4 g2 k64,shrink m8 n8 w2x4 g2 k64,shrink m4 n8 w2x4 g4 k64,pair" \
    | grep -E "rc=|shrink m|pair" | cut -d, -f2,3,5 | sort -t, -k2 -n | head -30
  (cd "$OUT" && tar cJf part1.tar.xz ./*.csv ./*.err tests.txt executor_cuda.txt summary.txt && rm -f ./*.csv ./*.err tests.txt executor_cuda.txt)
fi
if [ "$PART" = 2 ]; then
  run_bench 220 splits_mla "$MLA" --prefill-only --expand-splits --variant "m1 n8 s2 x4 by hand,m1 n8 s3 x4 by hand" \
    | grep -E "rc=|by hand" | cut -d, -f2,4 | sed 's/expand-splits m1 n8 //'
  run_bench 200 tiles_k128_mla "$MLA" --prefill-only --prefill-tiles \
    --variant "shrink m8 n8 w4x4 g2 k128,shrink m8 n8 w2x4 g2 k128,shrink m8 n8 w4x4 g2 k64 s3" \
    | grep -E "rc=|shrink m" | cut -d, -f2,3 | sort -t, -k2 -n
  (cd "$OUT" && tar cJf part2.tar.xz ./*.csv ./*.err && rm -f ./*.csv ./*.err)
fi
if [ "$PART" = 3 ]; then
  run_cuda_tests 420 cuda_bf16::prefill_shrink
  for r in 1 2; do ab_prefill "$r" "mla_qkv_a R=64"; done
  (cd "$OUT" && tar cJf part3.tar.xz ./*.csv ./*.err ./*.log summary.txt && rm -f ./*.csv ./*.err ./*.log)
fi
if [ "$PART" = 4 ]; then
  ab_prefill 1 "qkv R=64" "qkv R=16" "mla_qkv_a R=16"
  (cd "$OUT" && tar cJf part4.tar.xz ./*.csv ./*.err && rm -f ./*.csv ./*.err)
fi
if [ "$PART" = 5 ]; then
  ab_round 128 1 140
  ab_round 32 1 140
  compare_ab
  (cd "$OUT" && tar cJf part5.tar.xz ./*.csv ./*.err && rm -f ./*.csv ./*.err)
fi
if [ "$PART" = 6 ]; then
  cuda_tests_with_executor 520 cuda_bf16::segmented_shrink cuda_bf16::prefill_shrink cuda_bf16::split_k_shrink cuda_bf16::split_k_prefill
  (cd "$OUT" && tar cJf part6.tar.xz tests.txt executor_cuda.txt summary.txt && rm -f tests.txt executor_cuda.txt)
fi
if [ "$PART" = 7 ]; then
  ab_round 32 2 140
  compare_ab | grep -E "==|gate_up R=64|qkv R=16"
  ab_prefill 2 "qkv R=64" "mla_qkv_a R=64"
  (cd "$OUT" && tar cJf part7.tar.xz ./*.csv ./*.err && rm -f ./*.csv ./*.err)
fi
if [ "$PART" = 8 ]; then
  run_bench 240 splits16_mla "$MLA" --prefill-only --expand-splits \
    --variant "m1 n16 s2 x4 by hand,m1 n16 s3 x4 by hand,m1 n8 s2 x4 by hand tdefault" \
    | grep -E "rc=|by hand" | cut -d, -f2,4 | sed 's/expand-splits //'
  (cd "$OUT" && tar cJf part8.tar.xz ./*.csv ./*.err && rm -f ./*.csv ./*.err)
fi
