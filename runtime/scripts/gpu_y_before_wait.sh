#!/usr/bin/env bash
# Runs on the device machine: the expand of a shrink/expand pair reads its first y tile before
# its grid dependency point (`launch_pair_expand`, `YWrittenBy::EarlierKernel`), with B. Needs
# devbin/kernels, devbin/executor_cuda and devbin/lora_bench of the change and
# devbin/prev/lora_bench of the commit before it (same kernels otherwise).
#   PART=1: the CUDA tests (the programmatic chain now has a third pair whose expand's y was
#           written by the kernel two before it; the expand tests launch every other case as a
#           pair's expand; the executor) and A/B round 1 at T = 128 (run 83).
#   PART=2: A/B at T = 32, two rounds, and at T = 128, round 2 (run 84).
#   PART=3: after run 84 (a pair's CUDA-core expand was slower at T = 32 under PDL), y read
#           before B rather than after: prev, devbin/mid/lora_bench (y after B) and new, one
#           round each at T = 32 and T = 128, after the chain and expand tests; CSVs packed
#           into one archive (run 85).
#   PART=4: the final rule (the CUDA-core expand reads y early only when it sums a split-K
#           shrink's copies): CUDA tests, then prev against new at T = 32 and T = 128, one
#           round each; CSVs packed into one archive (run 86).
#   PART=5: the tensor-core expand reads y early only in grids of at most 8 cubes per
#           multiprocessor (gate_up's 1792 cubes lost its fast mode in runs 83-86): prev
#           against new at T = 128 (two rounds) and T = 32 (one); CSVs packed (run 87).
#   PART=6: gate_up R=64 stayed in its slow mode (33 µs) there. Run 88 timed a build whose
#           tensor-core expand, where it reads y after the wait, loads the intermediate
#           first again, as before the change: prev against it at T = 128, two rounds; CSVs
#           packed. gate_up stayed at 33.4 µs, so that build was not kept.
# A/B cases: every decode case with 8 adapters at that T, the default rows plus the split-K
# pair with the default 4-stage tile ("splitk pair default ... pdl").
#   run(command="PART=1 bash runtime/scripts/gpu_y_before_wait.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
for f in devbin/*.xz devbin/prev/*.xz devbin/mid/*.xz; do [ -e "${f%.xz}" ] || xz -dk "$f"; done
if [ "${PART:-1}" = 1 ]; then
    cuda_tests_with_executor 300 cuda_graph_decode_chain_f32 cuda_graph_decode_chain_bf16 cuda_graph_decode_bf16 \
        cuda_bf16::segmented_expand cuda_f32::segmented_expand cuda_bf16::prefill_expand cuda_bf16::split_k_shrink
    ab_round 128 1 150
elif [ "$PART" = 4 ]; then
    cuda_tests_with_executor 200 cuda_graph_decode_chain_f32 cuda_graph_decode_chain_bf16 cuda_graph_decode_bf16 \
        cuda_bf16::segmented_expand cuda_f32::segmented_expand cuda_bf16::split_k_shrink cuda_f32::split_k_shrink
    ab_round 32 1 130
    ab_round 128 1 150
    BUNDLE=1
elif [ "$PART" = 6 ]; then
    ab_round 128 1 150
    ab_round 128 2 150
    BUNDLE=1
elif [ "$PART" = 5 ]; then
    ab_round 128 1 150
    ab_round 32 1 130
    ab_round 128 2 150
    BUNDLE=1
elif [ "$PART" = 3 ]; then
    run_cuda_tests 120 cuda_graph_decode_chain_f32 cuda_graph_decode_chain_bf16 cuda_bf16::segmented_expand cuda_f32::segmented_expand
    (cd "$OUT" && { for f in cuda_*.log; do echo "== $f"; cat "$f"; done > tests.txt; rm -f cuda_*.log; })
    for t in 32 128; do
        cases=$(dense_decode_cases_8 "$t")
        for bin in prev mid new; do
            path=devbin/$bin/lora_bench
            [ "$bin" = new ] && path=devbin/lora_bench
            LORA_BENCH=$path run_bench 130 "t${t}_$bin" "$cases" --split-k --variant "splitk n1 g4 k128 s4 st4" > /dev/null
        done
        echo "T=$t done"
    done
    python3 - "$OUT" <<'PY'
import csv, os, sys
out = sys.argv[1]
def load(path):
    rows = csv.DictReader(l for l in open(path) if not l.startswith("#"))
    return {(r["case"], r["variant"]): float(r["pair_us"]) for r in rows}
for t in (32, 128):
    prev, mid, new = (load(os.path.join(out, f"t{t}_{b}.csv")) for b in ("prev", "mid", "new"))
    print(f"== T={t}: pair us, prev / y after B / y before B")
    for key in prev:
        if key in mid and key in new and ("graph" in key[1] or "pair default" in key[1]) and "per pair" not in key[1]:
            p, m, n = prev[key], mid[key], new[key]
            print(f"  {key[0][:24]:24} {key[1][:50]:50} {p:7.2f} / {m:7.2f} ({100 * (m / p - 1):+5.1f}%) / {n:7.2f} ({100 * (n / p - 1):+5.1f}%)")
PY
    (cd "$OUT" && tar czf bench.tgz t*.csv t*.err && rm -f t*.csv t*.err)
    exit 0
else
    ab_round 32 1 130
    ab_round 32 2 130
    ab_round 128 2 150
fi
# Pair µs of every PDL row, old against new, per round.
compare_ab
if [ "${BUNDLE:-0}" = 1 ]; then (cd "$OUT" && tar czf bench.tgz t*.csv t*.err && rm -f t*.csv t*.err); fi
