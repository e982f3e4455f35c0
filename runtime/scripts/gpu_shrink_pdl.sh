#!/usr/bin/env bash
# Runs on the device machine: the tensor-core shrinks' grid dependency point (their first A is
# loaded, or its copies issued, before the wait for the kernel before; x after it). Needs
# devbin/kernels and devbin/lora_bench of the change and devbin/prev/lora_bench of the commit
# before it.
#   PART=1: the CUDA graph tests (the two-layer programmatic chain now also runs both
#           tensor-core shrinks) and the tensor-core shrink tests, then A/B round 1.
#   PART=2: A/B rounds 2 and 3.
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
else
    ab_round 2
    ab_round 3
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
