#!/usr/bin/env bash
# Runs on the device machine: whether one kernel doing a decode pair's shrink and expand (the
# expand waiting on per-segment counters, scripts/triton_floor.py's fused_pair_kernel) beats
# the two-kernel pair, written in Triton first because it is quick to try; then lora_bench
# (devbin/lora_bench) on the same cases in the same call.
#   run(command="bash runtime/scripts/gpu_triton_fused.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
for f in devbin/*.xz; do [ -e "${f%.xz}" ] || xz -dk "$f"; done
python3 -c "import triton; print('triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
specs="qkv:16:32,qkv:16:8,gate_up:16:32,mla_qkv_a:16:32,qkv:64:32,mla_qkv_a:64:32,qkv:16:128"
timeout 420 python3 runtime/scripts/triton_floor.py --skip-floor --fused --cases "$specs" > "$OUT/triton_fused.csv" 2> "$OUT/triton_fused.err"
echo "triton_floor rc=$?"
grep -E "^#|pdl" "$OUT/triton_fused.csv"
tail -5 "$OUT/triton_fused.err"
cases="^qkv R=16 T=32 adapters=8,^qkv R=16 T=8 adapters=8,^gate_up R=16 T=32 adapters=8,^mla_qkv_a R=16 T=32 adapters=8"
cases="$cases,^qkv R=64 T=32 adapters=8,^mla_qkv_a R=64 T=32 adapters=8,^qkv R=16 T=128 adapters=8"
run_bench 150 lorac "$cases" | grep -E "rc=|pdl"
