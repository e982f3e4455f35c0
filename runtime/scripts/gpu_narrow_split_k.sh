#!/usr/bin/env bash
# Run 80 (2026-11-24): should the decode split-K shrink (4-stage tile) also take layouts
# narrower than 128 intermediate rows (rank 16: qkv 48, gate_up and MLA 32)? devbin/lora_bench
# built with `split_k_layout` accepting them: each case's "graph" row is the pair without room
# for copies (no split), "graph splitk default" the automatic split-K pair, in the same binary.
# Rank 16 at T = 128 with 1 and 8 adapters, and rank 64 with 1 adapter, two rounds.
#   run(command="bash runtime/scripts/gpu_narrow_split_k.sh", carry=["devbin"])
# TESTS=1 (run 81, after the change): the executor's CUDA tests (the wide fixture now also
# splits its 64-row sites) and the split-K shrink and chain tests (devbin/executor_cuda, kernels).
source "$(dirname "$0")/gpu_env.sh"
for f in devbin/*.xz; do [ -e "${f%.xz}" ] || xz -dk "$f"; done
if [ -n "${TESTS:-}" ]; then
    ( LORAC_TINY_FIXTURES=tests/fixtures/tiny timeout 300 devbin/executor_cuda --nocapture --test-threads 1 > "$OUT/executor_cuda.txt" 2>&1
      echo "executor_cuda rc=$?" >> "$OUT/summary.txt" ) &
    run_cuda_tests 300 cuda_bf16::split_k_shrink cuda_bf16::split_k_prefill cuda_graph_decode_chain_bf16
    wait
    cat "$OUT/summary.txt"
    grep -E "^test |test result|split K|panicked" "$OUT/executor_cuda.txt"
    (cd "$OUT" && { for f in cuda_*.log; do echo "== $f"; cat "$f"; done > tests.txt; rm -f cuda_*.log; })
    exit 0
fi
cases=""
for m in qkv gate_up mla_qkv_a; do cases="$cases,^$m R=16 T=128 ,^$m R=64 T=128 adapters=1"; done
for round in 1 2; do
    run_bench 200 "narrow$round" "${cases#,}" | grep -E ",graph,|,graph pdl,|splitk default"
done
