#!/usr/bin/env bash
# Runs on the device machine: the serving engine with the K-split LoRA shrink.
#
# PART=1 (default): the executor's CUDA tests (every fixture, bf16 and f32; the wide fixture
#   `llama_wide` splits K in its qkv and gate_up shrinks and must still match HF + PEFT) and the
#   executor's memory test on CUDA (nothing allocated while serving).
# PART=2: a random 4-layer Llama-3-8B-shaped bf16 model with 8 rank-64 adapters
#   (make_bench_model.py), compiled at max rank 64, then decode_bench with --split-k-ab: every
#   case with adapters with the K split on ("kernel") and off ("kernel-nosplit"), same engine.
#   Prefill of 8 × 128 tokens (1 or 8 segments) and decode of 128 sequences take the K split.
#
# Build here first:
#   export CARGO_TARGET_DIR=/work/main/target-rt
#   cargo test -p lorac-runtime --release --features cuda-tests --test executor_cuda --test executor --no-run
#   cargo build --release -p lorac -p lorac-runtime --bin lorac --bin decode_bench
#   cp the two test binaries to devbin/{executor_cuda,executor}, release/{lorac,decode_bench} to devbin/, strip,
#   xz the large ones (the device tool carries at most 64 MiB)
# then: run(command="PART=1 bash runtime/scripts/gpu_engine_split_k.sh", carry=["devbin"]).
source "$(dirname "$0")/gpu_env.sh"
for f in devbin/*.xz; do [ -e "$f" ] && [ ! -e "${f%.xz}" ] && xz -dk "$f"; done
PART=${PART:-1}
export LORAC_TINY_FIXTURES=tests/fixtures/tiny

if [ "$PART" = 1 ]; then
    echo "== executor CUDA tests =="
    SECONDS=0
    devbin/executor_cuda --nocapture --test-threads 1 > "$OUT/executor_cuda.log" 2>&1
    echo "exit $? after ${SECONDS} s"
    grep -E "^test |test result|worst|greedy:|divergence|split K|panicked" "$OUT/executor_cuda.log"
    echo "== executor memory test on CUDA =="
    devbin/executor cuda --nocapture --test-threads 1 > "$OUT/executor_noalloc.log" 2>&1
    echo "exit $?"
    grep -E "^test |test result|panicked" "$OUT/executor_noalloc.log"
fi

if [ "$PART" = 2 ]; then
    MODEL_DIR=/tmp/llama8b_r64
    if [ ! -f "$MODEL_DIR/config.json" ]; then
        SECONDS=0
        python3 runtime/scripts/make_bench_model.py --out "$MODEL_DIR" --layers 4 --adapters 8 --rank 64 > "$OUT/model_gen.log" 2>&1
        echo "model generated in ${SECONDS} s (exit $?)"
    fi
    ADAPTERS=$(for i in 0 1 2 3 4 5 6 7; do printf "%s " "${MODEL_DIR}_adapters/a$i"; done)
    devbin/lorac compile "$MODEL_DIR" --dtype bf16 --max-lora-rank 64 --max-loras 8 --lora-target-modules all-linear \
        --max-seqs 256 --max-batch-tokens 16384 --kv-cache-tokens 65536 -o /tmp/plan_r64.bin > "$OUT/compile.log" 2>&1
    echo "compile exit $?"
    SECONDS=0
    # shellcheck disable=SC2086
    timeout 480 devbin/decode_bench --model "$MODEL_DIR" --plan /tmp/plan_r64.bin --adapters $ADAPTERS --batches 8,128 \
        --adapter-counts 0,1,8 --prompt-len 128 --warmup 4 --steps 32 --split-k-ab --csv "$OUT/decode_split_k.csv" > "$OUT/decode_split_k.log" 2>&1
    echo "decode_bench exit $? after ${SECONDS} s"
    grep -E "^#|^batch|^\||panicked|rror" "$OUT/decode_split_k.log" | head -60
fi
