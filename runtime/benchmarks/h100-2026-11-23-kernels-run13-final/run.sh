#!/usr/bin/env bash
# Final kernel run: full lora_bench (decode, prefill with tile sweep, MoE) and the PyTorch baseline.
set -uo pipefail
mkdir -p "$OUT"
export CUDA_PATH=${CUDA_PATH:-/usr/local/cuda}
export LD_LIBRARY_PATH="$CUDA_PATH/lib64:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
echo "== lora_bench =="
timeout 400 devbin/k/lora_bench --csv "$OUT/bench.csv" 2> "$OUT/bench.err" | grep "^#"
tail -2 "$OUT/bench.err"
echo "== PyTorch baseline =="
timeout 160 python3 runtime/scripts/torch_lora_baseline.py --csv "$OUT/torch.csv" > /dev/null 2> "$OUT/torch.err" || tail -5 "$OUT/torch.err"
python3 runtime/scripts/summarize.py "$OUT/bench.csv" "$OUT/torch.csv" > "$OUT/summary.md"
head -80 "$OUT/summary.md"
