#!/usr/bin/env bash
# Pending GPU check of the warp-block tensor-core shrink and the emulated multiply (written
# 2026-11-23, when no device was lent): the CUDA prefill tests (they run 1×1, 2×1 and 2×2 warp
# blocks, register-staged and pipelined), then the shrink sweep of the cases where the shrink
# is the larger half of the prefill pair. Binaries as in gpu_run.sh, in devbin/:
#   run(command="bash runtime/scripts/gpu_warp_blocks.sh", carry=["devbin"])
# Each step has its own time limit so the whole stays inside one 600 s call.
source "$(dirname "$0")/gpu_env.sh"
# bf16 runs the tensor-core kernels; f32 the emulated multiply, pipelined stages included (not
# run anywhere yet: lavapipe has no cp.async).
echo "== CUDA prefill shrink, expand and chunked tests (bf16, f32) =="
timeout 300 devbin/kernels cuda_bf16::prefill_shrink cuda_bf16::prefill_expand cuda_bf16::chunked_prefill \
    cuda_f32::prefill_shrink cuda_f32::prefill_expand > "$OUT/cuda_tests.log" 2>&1
echo "rc=$?"
grep -E "^test .*(ok|FAILED)$|test result|panicked" "$OUT/cuda_tests.log" | head -8
# Shortlists (comma-separated name parts): the default row block with 32- and 64-token tiles
# and blocks of up to 2×2 fragments; the static table (BENCHMARKS.md, "no device lent") shows
# the 128-token tiles under one cube per multiprocessor and the 4-wide blocks spilling.
i=0
for spec in "qkv R=64 T=4096|m2 n4 w1,m2 n4 w2,m4 n4 w1,m4 n4 w2" \
    "mla_qkv_a R=64 T=4096|m2 n4 w1,m2 n4 w2,m4 n4 w1,m4 n4 w2" \
    "mla_qkv_a R=16 T=4096|m2 n2 w1,m2 n2 w2,m4 n2 w1,m4 n2 w2"; do
    c=${spec%%|*}
    v=${spec#*|}
    i=$((i + 1))
    echo "== shrink sweep: $c (the 8 fastest of the shortlist) =="
    timeout 240 devbin/lora_bench --prefill-only --case "$c" --variant "$v" --csv "$OUT/sweep$i.csv" > /dev/null 2> "$OUT/sweep$i.err"
    echo "rc=$?"
    grep -v "^#" "$OUT/sweep$i.csv" | grep shrink | cut -d, -f2,3 | sort -t, -k2 -g | head -8
done
