#!/usr/bin/env bash
# Run 37 (2026-11-23): every decode case (T = 1 to 128, dense and MoE) with the final decode
# kernels, then the MoE decode cases with the previous binaries (devbin/old/, 381c54c): the
# MoE per-pair shrink shares the CUDA-core shrink's inner loop.
#   run(command="bash runtime/scripts/gpu_decode_table.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
timeout 240 devbin/lora_bench --case "T=1 ,T=8 ,T=32 ,T=128 " --csv "$OUT/decode_new.csv" > /dev/null 2> "$OUT/bench.err"
echo "new rc=$?"
grep -v "^#" "$OUT/decode_new.csv" | cut -d, -f1-5,11
timeout 150 devbin/old/lora_bench --case "moe_gate_up R=16 T=8 ,moe_gate_up R=64 T=8 ,moe_down R=16 T=32 ,moe_down R=64 T=32 " \
    --csv "$OUT/moe_old.csv" > /dev/null 2>> "$OUT/bench.err"
echo "old rc=$?"
grep -v "^#" "$OUT/moe_old.csv" | cut -d, -f1-5,11
