#!/usr/bin/env bash
# Runs on the device machine (no Rust toolchain there, no network): the plan executor's CUDA
# tests against the HF + PEFT references of the tiny fixtures (bf16 and f32), then the decode
# benchmark on a random Llama-3-8B-shaped bf16 model: lorac's engine (decode_bench) and HF
# transformers + PEFT (hf_decode_bench.py) on the same GPU, same model, same adapters, and a
# summary table.
#
# Build here first (from the checkout that holds this branch):
#   export CARGO_TARGET_DIR=/work/main/target-rt
#   cargo build --release -p lorac                                   # -> release/lorac
#   cargo build --release -p lorac-runtime --bin decode_bench        # -> release/decode_bench
#   cargo test -p lorac-runtime --release --features cuda-tests --test executor_cuda --no-run
#                                                                    # -> deps/executor_cuda-<hash>
#   D=/work/main/devbin/gpu; mkdir -p $D/scripts $D/fixtures
#   cp $CARGO_TARGET_DIR/release/{lorac,decode_bench} $D/
#   cargo test -p lorac-runtime --release --features cuda-tests --test ops --no-run   # -> deps/ops-<hash> (optional)
#   cp $CARGO_TARGET_DIR/release/deps/executor_cuda-<hash> $D/executor_cuda && cp $CARGO_TARGET_DIR/release/deps/ops-<hash> $D/ops
#   (optional: the `executor` and `kernels` test binaries of the same --no-run: the CUDA
#   memory-statistics test and the CUDA LoRA kernel tests)
#   strip $D/lorac $D/decode_bench $D/executor_cuda $D/ops && xz -T2 $D/decode_bench $D/executor_cuda $D/ops   # under 64 MiB
#   cp -r tests/fixtures/tiny/{llama,qwen3} $D/fixtures/
#   cp runtime/scripts/{gpu_executor_run.sh,make_bench_model.py,hf_decode_bench.py} $D/scripts/
# then, with the device tool: run(command="bash devbin/gpu/scripts/gpu_executor_run.sh", carry=["devbin/gpu"]).
#
# Environment: BIN (the binaries and fixtures, default: the folder above this script's),
# LAYERS (decoder layers of the bench model, default 32), SKIP_TESTS=1, SKIP_OURS=1,
# SKIP_HF=1, OPS_BREAKDOWN=1 (decode_bench --ops: each base op timed alone), MODEL_DIR (default /tmp/llama8b; kept when its config.json exists, so a second
# call on a still-warm machine skips the generation), NEW_TOKENS (default 32).
set -uo pipefail
OUT=${OUT:-/tmp/decode_out}
# The device tool brings back at most 8 files: the small ones go to $EXTRA (their content is
# printed too, so a log of this script's output holds it).
EXTRA=${EXTRA:-/tmp/decode_extra}
mkdir -p "$OUT" "$EXTRA"
SCRIPTS=$(cd "$(dirname "$0")" && pwd)
BIN=${BIN:-$(dirname "$SCRIPTS")}
LAYERS=${LAYERS:-32}
MODEL_DIR=${MODEL_DIR:-/tmp/llama8b}
NEW_TOKENS=${NEW_TOKENS:-32}
if [ -z "${CUDA_PATH:-}" ]; then
    if [ -d /usr/local/cuda ]; then CUDA_PATH=/usr/local/cuda; else CUDA_PATH=$(dirname "$(dirname "$(command -v nvcc)")"); fi
fi
export CUDA_PATH
export LD_LIBRARY_PATH="$CUDA_PATH/lib64:${LD_LIBRARY_PATH:-}"
export PYTHONUNBUFFERED=1
# Binaries may travel xz-compressed (the device tool carries at most 64 MiB).
for f in "$BIN"/*.xz; do [ -e "$f" ] && [ ! -e "${f%.xz}" ] && xz -dk "$f"; done
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee "$EXTRA/gpu.txt"
date -u +"start %FT%TZ" | tee -a "$EXTRA/gpu.txt"

if [ -z "${SKIP_TESTS:-}" ]; then
    echo "== executor CUDA tests (tiny llama / qwen3 vs HF + PEFT; bf16 and f32) =="
    SECONDS=0
    LORAC_TINY_FIXTURES="$BIN/fixtures" "$BIN/executor_cuda" --nocapture --test-threads 1 > "$OUT/executor_cuda.log" 2>&1
    echo "exit $? after ${SECONDS} s"
    grep -E "^test |test result|worst|greedy:|divergence|panicked" "$OUT/executor_cuda.log"
    if [ -x "$BIN/executor" ]; then
        echo "== executor tests on CUDA (memory statistics unchanged while serving a mixed workload) =="
        LORAC_TINY_FIXTURES="$BIN/fixtures" "$BIN/executor" cuda --nocapture --test-threads 1 > "$OUT/executor_noalloc.log" 2>&1
        echo "exit $?"
        grep -E "^test |test result|panicked" "$OUT/executor_noalloc.log"
    fi
    if [ -x "$BIN/kernels" ]; then
        echo "== CUDA LoRA kernel tests (f32 and bf16, every family) =="
        "$BIN/kernels" cuda_ > "$OUT/kernels.log" 2>&1
        echo "exit $?"
        grep -E "^test |test result|panicked" "$OUT/kernels.log"
    fi
    if [ -x "$BIN/ops" ]; then
        echo "== CUDA matmul and attention op tests (every matmul route; attention plain and split) =="
        "$BIN/ops" --exact cuda_bf16::matmul cuda_f32::matmul cuda_bf16::matmul_cubek cuda_f32::matmul_cubek cuda_bf16::attention cuda_f32::attention > "$OUT/ops_matmul.log" 2>&1
        echo "exit $?"
        grep -E "^test |test result|panicked" "$OUT/ops_matmul.log"
    fi
fi

if { [ -z "${SKIP_OURS:-}" ] || [ -z "${SKIP_HF:-}" ]; } && [ ! -f "$MODEL_DIR/config.json" ]; then
    echo "== random Llama-3-8B-shaped model ($LAYERS layers, bf16) and 8 rank-16 adapters =="
    SECONDS=0
    python3 "$SCRIPTS/make_bench_model.py" --out "$MODEL_DIR" --layers "$LAYERS" --adapters 8 --rank 16 2>&1 | tee "$EXTRA/model_gen.log"
    echo "generated in ${SECONDS} s"
fi
ADAPTERS=$(for i in 0 1 2 3 4 5 6 7; do printf "%s " "${MODEL_DIR}_adapters/a$i"; done)

if [ -z "${SKIP_OURS:-}" ]; then
    echo "== lorac compile (bf16) =="
    "$BIN/lorac" compile "$MODEL_DIR" --dtype bf16 --max-lora-rank 16 --max-loras 8 --lora-target-modules all-linear \
        --max-seqs 64 --max-batch-tokens 4096 --kv-cache-tokens 16384 -o "$EXTRA/plan.bin" 2>&1 | tee "$EXTRA/compile.log"
    echo "== decode_bench (lorac engine, CUDA, bf16) =="
    SECONDS=0
    # shellcheck disable=SC2086
    "$BIN/decode_bench" --model "$MODEL_DIR" --plan "$EXTRA/plan.bin" --adapters $ADAPTERS --batches 1,8,32 --adapter-counts 0,1,8 \
        --prompt-len 128 --warmup 4 --steps "$NEW_TOKENS" ${OPS_BREAKDOWN:+--ops} --csv "$OUT/lorac.csv" > "$OUT/lorac.log" 2>&1
    echo "exit $? after ${SECONDS} s"
    grep -vE "^\s*$" "$OUT/lorac.log" | grep -E "^#|^\||^decode_bench|panicked" | head -80
fi

if [ -z "${SKIP_HF:-}" ]; then
    echo "== HF transformers + PEFT =="
    SECONDS=0
    # shellcheck disable=SC2086
    python3 "$SCRIPTS/hf_decode_bench.py" --model "$MODEL_DIR" --adapters $ADAPTERS --prompt-len 128 --new-tokens "$NEW_TOKENS" \
        --matmul --csv "$OUT/hf.csv" > "$OUT/hf.log" 2>&1
    echo "exit $? after ${SECONDS} s"
    grep -E "^#|^\||^batch|Error|error" "$OUT/hf.log" | head -60
fi

if [ -f "$OUT/lorac.csv" ] && [ -f "$OUT/hf.csv" ]; then
    echo "== summary =="
    python3 - "$OUT/lorac.csv" "$OUT/hf.csv" <<'PY' | tee "$OUT/summary.md"
import csv, sys
ours = {(int(r["batch"]), int(r["adapters"]), r.get("shrink", "-")): r for r in csv.DictReader(open(sys.argv[1]))}
hf = {(int(r["batch"]), int(r["adapters"])): r for r in csv.DictReader(open(sys.argv[2]))}
print("| batch | adapters | LoRA shrink | lorac step ms | lorac tok/s | lorac vs base | HF+PEFT step ms | HF tok/s | HF vs base | lorac / HF |")
print("|---|---|---|---|---|---|---|---|---|---|")
for key in sorted(ours):
    o, h = ours[key], hf.get(key[:2])
    pct = lambda v: "-" if not v else f"{float(v) * 100:+.1f}%"
    hs = f"{float(h['step_ms']):.2f}" if h else "-"
    ht = f"{float(h['tokens_per_s']):.1f}" if h else "-"
    ratio = f"{float(o['tokens_per_s']) / float(h['tokens_per_s']):.2f}×" if h else "-"
    print(f"| {key[0]} | {key[1]} | {key[2]} | {float(o['step_ms_median']):.3f} | {float(o['tokens_per_s']):.1f} | {pct(o['overhead_vs_base'])} | {hs} | {ht} | {pct(h['overhead_vs_base']) if h else '-'} | {ratio} |")
PY
fi
date -u +"end %FT%TZ"
