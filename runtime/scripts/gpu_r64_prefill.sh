#!/usr/bin/env bash
# Runs on the device machine (2026-11-25): what bounds the rank-64 prefill pairs after runs
# 124-131, and whether a 256-column expand tile (half the intermediate re-reads per y byte)
# beats the 128-column default.
#   PART=1: lora_bench --expand-splits on qkv and MLA R=64 (the 16 x 128 and 16 x 256 tiles,
#           both fragment kinds), then ncu (chosen sections) of the default shrink and expand
#           of both cases: third launch, caches flushed, unlocked clocks.
#   PART=2: the same sweep with the 16 x 256 tiles (by hand), beside the default.
#   PART=3: --prefill-tiles over the wide shrink tiles of both cases (ldmatrix fragments).
#   PART=4: CUDA tests and A/B (devbin/prev) of the tall MLA shrink and the expand split model.
#   PART=5: A/B (devbin/prev = 2b2eb6d) on the rank-64 MoE cases and the prefill cases left alone.
#   PART=6: ncu of the new MLA R=64 pair kernels, with the raw page (stall reasons).
#   PART=7: the expand with token rows read a tile ahead (new) against devbin/prev, alone.
#   PART=8: CUDA tests and pair A/B of the three-stage prefetching expand of two copies.
#   run(command="PART=1 bash runtime/scripts/gpu_r64_prefill.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
for f in devbin/*.xz devbin/prev/*.xz; do [ -e "${f%.xz}" ] || xz -dk "$f"; done
PART=${PART:-1}

# ncu_prefill TAG KERNEL CASE: ncu (the sections below) of the third launch of the kernels
# matching KERNEL in one profiling pass of CASE at T = 4096 with 8 adapters, caches flushed,
# unlocked clocks: $OUT/TAG_details.csv (and with RAW=1 the raw page, $OUT/TAG_raw.csv), the
# bench's output in $OUT/TAG_run.txt.
ncu_prefill() {
  local tag=$1 k=$2 c=$3
  timeout 150 ncu --cache-control all --clock-control none \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
    --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis \
    -k regex:"$k" --launch-skip 2 -c 1 -o "$OUT/$tag" -f \
    devbin/lora_bench --profile-pass --no-graphs --variant none --case "^$c T=4096 adapters=8" > "$OUT/${tag}_run.txt" 2>&1
  echo "$c $k: ncu rc=$?"
  ncu --import "$OUT/$tag.ncu-rep" --page details --csv > "$OUT/${tag}_details.csv" 2>&1
  [ -n "${RAW:-}" ] && ncu --import "$OUT/$tag.ncu-rep" --page raw --csv > "$OUT/${tag}_raw.csv" 2>&1
  rm -f "$OUT/$tag.ncu-rep"
}
if [ "$PART" = 1 ]; then
  for c in "qkv R=64" "mla_qkv_a R=64"; do
    name="splits_$(echo "$c" | tr ' =' '__')"
    run_bench 200 "$name" "^$c T=4096 adapters=8" --prefill-only --expand-splits --variant "m1 n16,m1 n8 s2,m1 n8 s3" \
      | grep -E "rc=|by hand" | grep -E "rc=|default|t8=|t4=|t2=" | cut -d, -f2,4
  done
  ncu --version | tail -1
  for c in "qkv R=64" "mla_qkv_a R=64"; do
    for k in shrink_mma expand_mma; do ncu_prefill "$(echo "$c $k" | tr -c 'A-Za-z0-9' '_')" "$k" "$c"; done
  done
  (cd "$OUT" && tar cJf part1.tar.xz ./*.csv ./*.err ./*_run.txt && rm -f ./*.csv ./*.err ./*_run.txt)
fi
if [ "$PART" = 2 ]; then
  # The 16 x 256 tiles (with_pipelined_tile) beside the default 16 x 128 one, by hand only.
  for c in "qkv R=64" "mla_qkv_a R=64"; do
    name="n16_$(echo "$c" | tr ' =' '__')"
    run_bench 200 "$name" "^$c T=4096 adapters=8" --prefill-only --expand-splits --variant "m1 n16,m1 n8 s2" \
      | grep -E "rc=|by hand" | cut -d, -f2,4
  done
  (cd "$OUT" && tar cJf part2.tar.xz ./*.csv ./*.err && rm -f ./*.csv ./*.err)
fi
if [ "$PART" = 3 ]; then
  # The wide shrink tiles (64 and 128 tokens by every A row) with ldmatrix fragments, every
  # warp block and K-group count, and the best per K-split count in a pair.
  run_bench 280 tiles_qkv "^qkv R=64 T=4096 adapters=8" --prefill-only --prefill-tiles --variant "shrink m4 n12,shrink m8 n12,pair" \
    | grep -E "rc=|shrink m|pair" | cut -d, -f2,3,5 | sort -t, -k2 -n | head -24
  run_bench 280 tiles_mla "^mla_qkv_a R=64 T=4096 adapters=8" --prefill-only --prefill-tiles --variant "shrink m4 n8,shrink m8 n8,pair" \
    | grep -E "rc=|shrink m|pair" | cut -d, -f2,3,5 | sort -t, -k2 -n | head -24
  (cd "$OUT" && tar cJf part3.tar.xz ./*.csv ./*.err && rm -f ./*.csv ./*.err)
fi
if [ "$PART" = 4 ]; then
  # The tall wide shrink (MLA) and the by-hand expand's token-split model: CUDA tests, then A/B
  # against devbin/prev (HEAD before them) on the rank-64 prefill pairs (two rounds) and the
  # rank-64 MoE cases at T = 1024 (grouped rows, one round).
  cuda_tests_with_executor 300 cuda_bf16::split_k_prefill cuda_bf16::prefill_expand cuda_bf16::chunked_prefill cuda_bf16::moe
  for r in 1 2; do ab_prefill "$r" "qkv R=64" "mla_qkv_a R=64"; done
  for bin in prev new; do
    lb=devbin/lora_bench; [ $bin = prev ] && lb=devbin/prev/lora_bench
    LORA_BENCH=$lb run_bench 100 "moe_${bin}" "moe_gate_up R=64 T=1024,moe_down_per_pair R=64 T=1024" --variant grouped | grep -E "rc=|graph"
  done
  (cd "$OUT" && tar cJf part4.tar.xz prev*.csv new*.csv moe_*.csv ./*.err && rm -f prev*.csv new*.csv moe_*.csv ./*.err)
fi
if [ "$PART" = 5 ]; then
  # A/B against devbin/prev = 2b2eb6d: the rank-64 MoE cases at T = 1024 (grouped rows) and one
  # round of the prefill cases the change should leave alone (rank 16, gate_up R=64).
  for bin in prev new; do
    lb=devbin/lora_bench; [ $bin = prev ] && lb=devbin/prev/lora_bench
    LORA_BENCH=$lb run_bench 120 "moe_${bin}" "moe_gate_up R=64 T=1024,moe_down_per_pair R=64 T=1024" --variant grouped | grep -E "rc=|graph"
  done
  ab_prefill 1 "gate_up R=64" "qkv R=16" "mla_qkv_a R=16"
  (cd "$OUT" && tar cJf part5.tar.xz prev*.csv new*.csv moe_*.csv ./*.err && rm -f prev*.csv new*.csv moe_*.csv ./*.err)
fi
if [ "$PART" = 6 ]; then
  # ncu of the new MLA R=64 prefill pair (the tall wide shrink, the expand of four copies split
  # four ways): the sections of PART=1, and from the raw page the warp stall reasons.
  for k in shrink_mma expand_mma; do RAW=1 ncu_prefill "mla_R64_$k" "$k" "mla_qkv_a R=64"; done
  (cd "$OUT" && tar cJf part6.tar.xz ./*.csv ./*_run.txt && rm -f ./*.csv ./*_run.txt)
fi
if [ "$PART" = 7 ]; then
  # Token rows read a tile ahead in the by-hand expand (new) against devbin/prev: each expand
  # alone, two and three stages, two copies, every token split, qkv and MLA R=64.
  for c in "qkv R=64" "mla_qkv_a R=64"; do
    for bin in prev new; do
      lb=devbin/lora_bench; [ $bin = prev ] && lb=devbin/prev/lora_bench
      name="rows_${bin}_$(echo "$c" | tr ' =' '__')"
      echo "-- $bin $c"
      LORA_BENCH=$lb run_bench 150 "$name" "^$c T=4096 adapters=8" --prefill-only --expand-splits \
        --variant "m1 n8 s2 x2 by hand,m1 n8 s3 x2 by hand" | grep -E "rc=|by hand" | cut -d, -f2,4 | sed 's/expand-splits m1 n8 //'
    done
  done
  (cd "$OUT" && tar cJf part7.tar.xz ./*.csv ./*.err && rm -f ./*.csv ./*.err)
fi
if [ "$PART" = 8 ]; then
  # The rank-64 by-hand expand adding up two copies in three stages, reading token rows a tile
  # ahead (new) against devbin/prev: CUDA tests, then the qkv R=64 pair (two rounds) and MLA
  # R=64 (one round; its expand of four copies should not change).
  cuda_tests_with_executor 300 cuda_bf16::prefill_expand cuda_bf16::split_k_prefill
  for r in 1 2; do ab_prefill "$r" "qkv R=64"; done
  ab_prefill 1 "mla_qkv_a R=64"
  (cd "$OUT" && tar cJf part8.tar.xz prev*.csv new*.csv ./*.err tests.txt executor_cuda.txt summary.txt && rm -f prev*.csv new*.csv ./*.err tests.txt executor_cuda.txt)
fi
