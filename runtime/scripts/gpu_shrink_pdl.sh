#!/usr/bin/env bash
# Runs on the device machine: the tensor-core shrinks' grid dependency point (their first A is
# loaded, or its copies issued, before the wait for the kernel before; x after it). Needs
# devbin/kernels and devbin/lora_bench of the change and devbin/prev/lora_bench of the commit
# before it.
#   PART=1: the CUDA graph tests (the two-layer programmatic chain now also runs both
#           tensor-core shrinks) and the split-K shrink tests, then A/B round 1 (run 76).
#   PART=2: the prefill shrink tests (every tensor-core tile; 240 s beside five other tests
#           was too short in run 76), then A/B round 2 (run 77).
#   PART=3: A/B round 3, then the split-K sweep (2 and 4 splits) of qkv R=16 T=32 with 8
#           adapters, the case of the < 5 µs goal, with the new binary (run 78).
#   PART=4: the f32 prefill shrink test alone (394 s in run 53; 380 s was short in run 77).
#   PART=5: after the split-K default became the 4-stage tile (devbin/executor_cuda too): the
#           rank-64 T = 128 defaults, then in parallel the f32 prefill shrink, the split-K
#           shrink tests (the automatic choice), the chain and the executor's CUDA tests (the
#           wide fixture splits K in the engine) (run 79).
# A/B cases: every T = 128 decode case with 8 adapters, the default rows plus the split-K pair
# with the register-staged default tile and with the 4-stage tile of run 75.
#   run(command="PART=1 bash runtime/scripts/gpu_shrink_pdl.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
for f in devbin/*.xz devbin/prev/*.xz; do [ -e "${f%.xz}" ] || xz -dk "$f"; done
cases=$(dense_decode_cases_8 128)
ab_round() {
    local round=$1
    LORA_BENCH=devbin/prev/lora_bench run_bench 150 "prev$round" "$cases" --split-k --variant "splitk n1 g4 k128 s4 st4" > /dev/null
    run_bench 150 "new$round" "$cases" --split-k --variant "splitk n1 g4 k128 s4 st4" > /dev/null
    echo "round $round done"
}
if [ "${PART:-1}" = 1 ]; then
    run_cuda_tests 240 cuda_graph_decode_chain_f32 cuda_graph_decode_chain_bf16 cuda_graph_decode_bf16 \
        cuda_bf16::prefill_shrink cuda_f32::prefill_shrink cuda_bf16::split_k_shrink cuda_bf16::split_k_prefill
    (cd "$OUT" && { for f in cuda_*.log; do echo "== $f"; cat "$f"; done > tests.txt; rm -f cuda_*.log; })
    ab_round 1
elif [ "$PART" = 2 ]; then
    run_cuda_tests 380 cuda_bf16::prefill_shrink cuda_f32::prefill_shrink
    (cd "$OUT" && { for f in cuda_*.log; do echo "== $f"; cat "$f"; done > tests.txt; rm -f cuda_*.log; })
    ab_round 2
elif [ "$PART" = 3 ]; then
    ab_round 3
    run_bench 200 qkv16_t32 "^qkv R=16 T=32 adapters=8" --split-k --variant "s2,s4" | grep -E "graph|pair"
elif [ "$PART" = 5 ]; then
    run_bench 100 defaults_r64 "^qkv R=64 T=128 adapters=8,^gate_up R=64 T=128 adapters=8,^mla_qkv_a R=64 T=128 adapters=8" \
        | grep -E ",graph|splitk default"
    ( LORAC_TINY_FIXTURES=tests/fixtures/tiny timeout 500 devbin/executor_cuda --nocapture --test-threads 1 > "$OUT/executor_cuda.txt" 2>&1
      echo "executor_cuda rc=$?" >> "$OUT/summary.txt" ) &
    run_cuda_tests 500 cuda_f32::prefill_shrink cuda_bf16::split_k_shrink cuda_f32::split_k_shrink cuda_graph_decode_chain_bf16
    wait
    cat "$OUT/summary.txt"
    grep -E "^test |test result|split K|panicked" "$OUT/executor_cuda.txt"
    (cd "$OUT" && { for f in cuda_*.log; do echo "== $f"; cat "$f"; done > tests.txt; rm -f cuda_*.log; })
    exit 0
else
    run_cuda_tests 560 cuda_f32::prefill_shrink
    (cd "$OUT" && { for f in cuda_*.log; do echo "== $f"; cat "$f"; done > tests.txt; rm -f cuda_*.log; })
    exit 0
fi
# Pair µs of every PDL row, old against new, per round.
python3 - "$OUT" <<'PY'
import csv, glob, os, sys
out = sys.argv[1]
def load(path):
    rows = csv.DictReader(l for l in open(path) if not l.startswith("#"))
    return {(r["case"], r["variant"]): float(r["pair_us"]) for r in rows}
for new in sorted(glob.glob(os.path.join(out, "new*.csv"))):
    prev = new.replace("new", "prev")
    if not os.path.exists(prev):
        continue
    a, b = load(prev), load(new)
    print(f"== {os.path.basename(prev)} -> {os.path.basename(new)}")
    for key in a:
        if key in b and ("pdl" in key[1] or "splitk" in key[1]) and a[key] == a[key]:
            print(f"  {key[0][:22]:22} {key[1][:60]:60} {a[key]:7.2f} -> {b[key]:7.2f} ({100 * (b[key] / a[key] - 1):+.1f}%)")
PY
