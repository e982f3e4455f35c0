#!/usr/bin/env bash
# Runs on the device machine: what merely reading a case's bytes costs in a CUDA graph, and a
# segmented LoRA pair written in Triton, on the decode cases lorac misses its goals on
# (scripts/triton_floor.py), then lora_bench (devbin/lora_bench, at HEAD) on the same cases in
# the same call, so the two compare on one machine and one copy bandwidth.
#   run(command="bash runtime/scripts/gpu_triton_floor.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
for f in devbin/*.xz; do [ -e "${f%.xz}" ] || xz -dk "$f"; done
python3 -c "import triton; print('triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout 380 python3 runtime/scripts/triton_floor.py > "$OUT/triton_floor.csv" 2> "$OUT/triton_floor.err"
echo "triton_floor rc=$?"
cat "$OUT/triton_floor.csv"
tail -5 "$OUT/triton_floor.err"
cases="^qkv R=16 T=32 adapters=8,^qkv R=64 T=32 adapters=8,^gate_up R=64 T=32 adapters=8,^mla_qkv_a R=64 T=32 adapters=8"
cases="$cases,^qkv R=16 T=128 adapters=8,^qkv R=64 T=128 adapters=8,^gate_up R=64 T=128 adapters=8,^mla_qkv_a R=64 T=128 adapters=8"
run_bench 180 lorac "$cases" --split-k --variant "splitk n1 g4 k128 s4 st4" | grep -E "rc=|graph|pdl"
