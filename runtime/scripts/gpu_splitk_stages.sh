#!/usr/bin/env bash
# Runs on the device machine (lora_bench in devbin/): the split-K sweep of the rank-64 T = 128
# decode cases (8 adapters), 4 and 8 splits, every tile staged through registers (one chunk
# ahead) and through 2-4 shared-memory stages (`cp.async`, up to three chunks ahead): is the
# split-K shrink waiting on one chunk at a time? Prints each case's six fastest shrinks and
# the pair rows; the full CSV is $OUT/splitk_stages.csv.
source "$(dirname "$0")/gpu_env.sh"
for f in devbin/*.xz; do [ -e "${f%.xz}" ] || xz -dk "$f"; done
timeout 540 devbin/lora_bench --case "^qkv R=64 T=128 adapters=8,^mla_qkv_a R=64 T=128 adapters=8,^gate_up R=64 T=128 adapters=8" \
    --split-k --variant "s4,s8" --csv "$OUT/splitk_stages.csv" > /dev/null 2> "$OUT/splitk_stages.err"
echo "rc=$?"
python3 - "$OUT/splitk_stages.csv" <<'PY'
import csv, sys
rows = [r for r in csv.DictReader(l for l in open(sys.argv[1]) if not l.startswith("#"))]
for case in dict.fromkeys(r["case"] for r in rows):
    mine = [r for r in rows if r["case"] == case]
    shrinks = sorted((r for r in mine if r["variant"].startswith("splitk n")), key=lambda r: float(r["shrink_us"]))
    print(f"== {case}")
    for r in shrinks[:6]:
        print(f"  {r['variant']}: shrink {float(r['shrink_us']):.2f}")
    for r in mine:
        if "pair default" in r["variant"] or r["variant"].startswith("graph"):
            print(f"  {r['variant']}: pair {float(r['pair_us']):.2f} ({float(r['pair_frac_copy']):.3f})")
PY
