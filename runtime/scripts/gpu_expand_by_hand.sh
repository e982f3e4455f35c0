#!/usr/bin/env bash
# Runs on the device machine: the pipelined prefill expand multiplying by hand (ldmatrix
# operand loads, m16n8k16 MMAs, sums added to the staged y with ldmatrix/stmatrix; new) against
# cooperative matrices with an f32 delta tile (devbin/prev/lora_bench).
#   PART=1: the CUDA expand tests (every tile, both fragment kinds) and the executor's CUDA
#           tests, then one A/B round on the rank-64 qkv and MLA prefill cases.
#   PART=2: A/B rounds ROUNDS (default "1") on CASES (default every prefill case).
#   PART=3: A/B on the decode cases at T = 32 and 128 with 8 adapters.
#   run(command="PART=1 bash runtime/scripts/gpu_expand_by_hand.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
for f in devbin/*.xz devbin/prev/*.xz; do [ -e "${f%.xz}" ] || xz -dk "$f"; done
PART=${PART:-1}
if [ "$PART" = 1 ]; then
  cuda_tests_with_executor 300 cuda_bf16::prefill_expand cuda_bf16::split_k_prefill cuda_bf16::chunked_prefill
  ab_prefill 1 "qkv R=64" "mla_qkv_a R=64"
  (cd "$OUT" && tar cJf prefill_ab.tar.xz prev*.csv new*.csv ./*.err && rm -f prev*.csv new*.csv ./*.err)
elif [ "$PART" = 2 ]; then
  IFS=, read -ra cases <<< "${CASES:-qkv R=16,qkv R=64,mla_qkv_a R=16,mla_qkv_a R=64,gate_up R=16,gate_up R=64}"
  for r in ${ROUNDS:-1}; do ab_prefill "$r" "${cases[@]}"; done
  (cd "$OUT" && tar cJf prefill_ab.tar.xz prev*.csv new*.csv ./*.err && rm -f prev*.csv new*.csv ./*.err)
elif [ "$PART" = 3 ]; then
  for t in 32 128; do ab_round "$t" 1 100; done
  compare_ab
  (cd "$OUT" && tar cJf ab.tar.xz ./*.csv ./*.err && rm -f ./*.csv ./*.err)
fi
