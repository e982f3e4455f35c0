#!/usr/bin/env bash
# Prefill sweep (run 15), then the CUDA kernel tests if time allows.
set -uo pipefail
mkdir -p "$OUT"
export CUDA_PATH=${CUDA_PATH:-/usr/local/cuda}
export LD_LIBRARY_PATH="$CUDA_PATH/lib64:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
echo "== lora_bench --prefill-only =="
timeout 420 devbin/k/lora_bench --prefill-only --csv "$OUT/bench.csv" > "$OUT/bench.out" 2> "$OUT/bench.err"; echo "bench rc=$?"
head -1 "$OUT/bench.csv"
grep -E "segmented|chunked" "$OUT/bench.csv" | cut -d, -f1-5,10-11
grep -E "shrink m" "$OUT/bench.csv" | cut -d, -f1-3 | sort -t, -k1,1 -k3,3g | awk -F, '{c[$1]++; if (c[$1]<=4 || $2 ~ /default/) print}'
grep -E "expand m" "$OUT/bench.csv" | cut -d, -f1,2,4 | sort -t, -k1,1 -k3,3g | awk -F, '{c[$1]++; if (c[$1]<=4 || $2 ~ /default|m2 n8$/) print}'
