#!/usr/bin/env bash
# Runs on the device machine: the pipelined tensor-core expand loading each warp's B
# fragments from the pool into registers once per cube (new) against staging the B block in
# shared memory and loading its fragments every tile (devbin/prev/lora_bench).
#   PART=1: CUDA tests (prefill_expand and split_k_prefill in bf16 run the pipelined tiles on
#           tensor cores), the executor's CUDA tests, then one A/B round on the rank-64 cases.
#   PART=2: A/B rounds ROUNDS (default "1 2") on CASES (default every prefill case).
#   The A/B rows: graph (the default pair) and every expand tile at its default token split.
#   run(command="PART=1 bash runtime/scripts/gpu_b_fragments.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
for f in devbin/*.xz devbin/prev/*.xz; do [ -e "${f%.xz}" ] || xz -dk "$f"; done
PART=${PART:-1}
ab_round() {  # ab_round ROUND CASE...
  local round=$1 c name; shift
  for c in "$@"; do
    name="$(echo "$c" | tr ' =' '__')"
    for bin in prev new; do
      lb=devbin/lora_bench; [ $bin = prev ] && lb=devbin/prev/lora_bench
      LORA_BENCH=$lb run_bench 120 "${bin}${round}_$name" "^$c T=4096 adapters=8" --expand-splits --variant tdefault | grep -E "rc=|graph,|graph pdl,"
      grep "expand-splits" "$OUT/${bin}${round}_$name.csv" | cut -d, -f2,4 | sed 's/expand-splits //; s/ tdefault=/ t/; s/ KiB//' | tr '\n' ';'; echo
    done
  done
}
if [ "$PART" = 1 ]; then
  cuda_tests_with_executor 240 cuda_bf16::prefill_expand cuda_bf16::split_k_prefill
  ab_round 1 "qkv R=64" "mla_qkv_a R=64"
else
  IFS=, read -ra cases <<< "${CASES:-qkv R=16,qkv R=64,mla_qkv_a R=16,mla_qkv_a R=64,gate_up R=16,gate_up R=64}"
  for r in ${ROUNDS:-1 2}; do ab_round "$r" "${cases[@]}"; done
fi
