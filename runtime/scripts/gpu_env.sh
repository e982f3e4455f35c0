# Sourced by the device-machine scripts: strict mode, the output folder ($OUT, which the device
# tool returns), the CUDA libraries cubecl loads, and the GPU's name, driver and clock in
# $OUT/gpu.txt.
set -uo pipefail
OUT=${OUT:-/tmp/lora_out}
mkdir -p "$OUT"
export CUDA_PATH=${CUDA_PATH:-/usr/local/cuda}
export LD_LIBRARY_PATH="$CUDA_PATH/lib64:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"

# run_cuda_tests LIMIT TEST...: each named test of devbin/kernels in its own process, all at
# once (their NVRTC compiles run in parallel and each log shows whether its test finished),
# LIMIT seconds each; logs in $OUT/<test>.log, then the summary and each test's result.
run_cuda_tests() {
    local limit=$1 t
    shift
    for t in "$@"; do
        ( start=$(date +%s); timeout "$limit" devbin/kernels "$t" --exact > "$OUT/${t//::/_}.log" 2>&1; rc=$?
          echo "$t rc=$rc $(( $(date +%s) - start ))s" >> "$OUT/summary.txt" ) &
    done
    wait
    cat "$OUT/summary.txt"
    grep -hE "^test .*(ok|FAILED)$|panicked" "$OUT"/cuda_*.log | head -20
}

# cuda_tests_with_executor LIMIT TEST...: devbin/executor_cuda (one thread, 300 s, its output in
# $OUT/executor_cuda.txt) alongside run_cuda_tests LIMIT TEST..., then both summaries; the
# tests' logs end up together in $OUT/tests.txt.
cuda_tests_with_executor() {
    ( LORAC_TINY_FIXTURES=tests/fixtures/tiny timeout 300 devbin/executor_cuda --nocapture --test-threads 1 > "$OUT/executor_cuda.txt" 2>&1
      echo "executor_cuda rc=$?" >> "$OUT/summary.txt" ) &
    run_cuda_tests "$@"
    wait
    cat "$OUT/summary.txt"
    grep -E "test result|panicked" "$OUT/executor_cuda.txt" | tail -4
    (cd "$OUT" && { for f in cuda_*.log; do echo "== $f"; cat "$f"; done > tests.txt; rm -f cuda_*.log; })
}

# run_bench LIMIT NAME CASES [ARGS...]: lora_bench ($LORA_BENCH, default devbin/lora_bench)
# on the comma-separated CASES within LIMIT seconds, its CSV in $OUT/NAME.csv and stderr in
# $OUT/NAME.err, then the exit status and each row's case, variant, shrink/expand/pair µs and
# fraction of copy bandwidth.
run_bench() {
    local limit=$1 name=$2 cases=$3
    shift 3
    timeout "$limit" "${LORA_BENCH:-devbin/lora_bench}" --case "$cases" --csv "$OUT/$name.csv" "$@" > /dev/null 2> "$OUT/$name.err"
    echo "rc=$?"
    grep -v "^#" "$OUT/$name.csv" | cut -d, -f1-5,11
}

# run_ab LIMIT PREFIX CASES ROUND...: for each ROUND, run_bench on CASES with the previous
# binaries (devbin/prev/lora_bench, $OUT/PREFIXprevROUND.csv), then with the new ones
# ($OUT/PREFIXnewROUND.csv): alternating, so drift between rounds reaches both alike.
run_ab() {
    local limit=$1 prefix=$2 cases=$3 round
    shift 3
    for round in "$@"; do
        LORA_BENCH=devbin/prev/lora_bench run_bench "$limit" "${prefix}prev$round" "$cases"
        run_bench "$limit" "${prefix}new$round" "$cases"
    done
}

# dense_decode_cases: lora_bench --case parts for every dense decode case (qkv, gate_up,
# MLA; R = 16, 64; T = 1 to 128; both adapter counts).
dense_decode_cases() {
    local cases="" m r t
    for m in qkv gate_up mla_qkv_a; do
        for r in 16 64; do
            for t in 1 8 32 128; do cases="$cases,^$m R=$r T=$t "; done
        done
    done
    echo "${cases#,}"
}

# dense_decode_cases_8 T...: lora_bench --case parts for every dense decode case with 8
# adapters at the given token counts.
dense_decode_cases_8() {
    local cases="" m r t
    for m in qkv gate_up mla_qkv_a; do
        for r in 16 64; do
            for t in "$@"; do cases="$cases,^$m R=$r T=$t adapters=8"; done
        done
    done
    echo "${cases#,}"
}

# ab_round T ROUND LIMIT [ARGS...]: every dense decode case with 8 adapters at T tokens, with
# devbin/prev/lora_bench then devbin/lora_bench ($OUT/tT_prevROUND.csv, $OUT/tT_newROUND.csv),
# the default rows plus the split-K pair with the default 4-stage tile.
ab_round() {
    local t=$1 round=$2 limit=$3 cases
    shift 3
    cases=$(dense_decode_cases_8 "$t")
    LORA_BENCH=devbin/prev/lora_bench run_bench "$limit" "t${t}_prev$round" "$cases" --split-k --variant "splitk n1 g4 k128 s4 st4" "$@" > /dev/null
    run_bench "$limit" "t${t}_new$round" "$cases" --split-k --variant "splitk n1 g4 k128 s4 st4" "$@" > /dev/null
    echo "T=$t round $round done"
}

# compare_ab: for each $OUT/t*_newN.csv with its t*_prevN.csv, the pair µs of every graph and
# "pair default" row, prev -> new, with the change in percent.
compare_ab() {
    python3 - "$OUT" <<'PY'
import csv, glob, os, sys
out = sys.argv[1]
def load(path):
    rows = csv.DictReader(l for l in open(path) if not l.startswith("#"))
    return {(r["case"], r["variant"]): float(r["pair_us"]) for r in rows}
for new in sorted(glob.glob(os.path.join(out, "t*_new*.csv"))):
    prev = new.replace("_new", "_prev")
    if not os.path.exists(prev):
        continue
    a, b = load(prev), load(new)
    print(f"== {os.path.basename(prev)} -> {os.path.basename(new)}")
    for key in a:
        if key in b and a[key] == a[key] and b[key] == b[key] and ("graph" in key[1] or "pair default" in key[1]) and "per pair" not in key[1]:
            print(f"  {key[0][:24]:24} {key[1][:56]:56} {a[key]:7.2f} -> {b[key]:7.2f} ({100 * (b[key] / a[key] - 1):+.1f}%)")
PY
}

# ab_prefill ROUND CASE...: each prefill CASE (T = 4096, 8 adapters; default rows only) with
# devbin/prev/lora_bench, then devbin/lora_bench ($OUT/prevROUND_CASE.csv, newROUND_CASE.csv),
# printing the graph and graph pdl rows.
ab_prefill() {
  local round=$1 c name bin lb; shift
  for c in "$@"; do
    name="$(echo "$c" | tr ' =' '__')"
    for bin in prev new; do
      lb=devbin/lora_bench; [ $bin = prev ] && lb=devbin/prev/lora_bench
      echo "-- $bin round $round"
      LORA_BENCH=$lb run_bench 120 "${bin}${round}_$name" "^$c T=4096 adapters=8" --variant none | grep -E "rc=|,graph,|graph pdl,"
    done
  done
}
