#!/usr/bin/env bash
# Runs on the device machine: the tensor-core shrink multiplying by hand (ldmatrix loads,
# m16n8k16 MMAs; new) against cooperative matrices (wmma; devbin/prev/lora_bench).
#   PART=1: the CUDA shrink tests (every tile, both fragment kinds where the device has
#           ldmatrix) and the executor's CUDA tests, then one A/B round of the default rows
#           (graph, graph pdl) on the rank-64 prefill cases.
#   PART=2: A/B rounds ROUNDS (default "1 2") on CASES (default every prefill case).
#   PART=3: A/B on the decode cases at T = 32 and 128 with 8 adapters (the tensor-core
#           shrinks), then a second prefill round on the rank-64 cases.
#   PART=4: the CUDA shrink tests and the executor's (420 s).
#   PART=5: A/B on the MoE cases at T = 1024 (grouped MoE LoRA runs the dense kernels);
#           run 122: every case (only R=16 finished), run 123: MOE_CASES="R=64 T=1024 adapters".
#   run(command="PART=1 bash runtime/scripts/gpu_ldmatrix.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
for f in devbin/*.xz devbin/prev/*.xz; do [ -e "${f%.xz}" ] || xz -dk "$f"; done
PART=${PART:-1}
if [ "$PART" = 1 ]; then
  cuda_tests_with_executor 280 cuda_bf16::prefill_shrink cuda_bf16::split_k_shrink cuda_bf16::split_k_prefill cuda_bf16::segmented_shrink
  ab_prefill 1 "qkv R=64" "mla_qkv_a R=64"
elif [ "$PART" = 2 ]; then
  IFS=, read -ra cases <<< "${CASES:-qkv R=16,qkv R=64,mla_qkv_a R=16,mla_qkv_a R=64,gate_up R=16,gate_up R=64}"
  for r in ${ROUNDS:-1 2}; do ab_prefill "$r" "${cases[@]}"; done
  (cd "$OUT" && tar cJf prefill_ab.tar.xz prev*.csv new*.csv ./*.err && rm -f prev*.csv new*.csv ./*.err)
elif [ "$PART" = 3 ]; then
  for t in 32 128; do ab_round "$t" 1 100; done
  compare_ab
  ab_prefill 2 "qkv R=64" "mla_qkv_a R=64" "gate_up R=64"
  (cd "$OUT" && tar cJf ab.tar.xz ./*.csv ./*.err && rm -f ./*.csv ./*.err)
fi
if [ "$PART" = 5 ]; then
  for bin in prev new; do
    lb=devbin/lora_bench; [ $bin = prev ] && lb=devbin/prev/lora_bench
    echo "-- $bin"
    LORA_BENCH=$lb run_bench 140 "moe_$bin" "${MOE_CASES:-T=1024 adapters}" | grep -E "rc=|graph"
  done
  (cd "$OUT" && tar cJf moe_ab.tar.xz moe_*.csv moe_*.err && rm -f moe_*.csv moe_*.err)
fi
if [ "$PART" = 4 ]; then
  cuda_tests_with_executor 420 cuda_bf16::prefill_shrink cuda_bf16::split_k_prefill cuda_bf16::split_k_shrink cuda_bf16::segmented_shrink
fi
