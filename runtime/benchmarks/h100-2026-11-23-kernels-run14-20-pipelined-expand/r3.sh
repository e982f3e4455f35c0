#!/usr/bin/env bash
# CUDA tests (kernels, executor), then the prefill defaults of all six cases and the expand
# sweep of the three cases run 15 did not reach.
set -uo pipefail
mkdir -p "$OUT"
export CUDA_PATH=${CUDA_PATH:-/usr/local/cuda}
export LD_LIBRARY_PATH="$CUDA_PATH/lib64:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
echo "== CUDA kernel tests =="
timeout 330 devbin/k/kernels cuda_ > "$OUT/cuda_tests.log" 2>&1; echo "rc=$?"
grep -E "^test .*(FAILED|ok)$|test result|panicked" "$OUT/cuda_tests.log" | grep -v " ok$" | head
grep -c " ok$" "$OUT/cuda_tests.log"
echo "== executor CUDA tests =="
timeout 120 devbin/k/executor_cuda --test-threads 1 > "$OUT/executor_cuda.log" 2>&1; echo "rc=$?"
grep -E "test result|panicked" "$OUT/executor_cuda.log" | head -5
echo "== prefill defaults =="
timeout 60 devbin/k/lora_bench --prefill-only --variant zzz --csv "$OUT/defaults.csv" > /dev/null 2> "$OUT/defaults.err"; echo "rc=$?"
cat "$OUT/defaults.csv" | cut -d, -f1-5,10-11
echo "== expand sweep, remaining cases =="
for c in "gate_up R=64 T=4096" "mla_qkv_a R=16 T=4096" "mla_qkv_a R=64 T=4096"; do
  timeout 60 devbin/k/lora_bench --prefill-only --case "$c" --variant "expand m" --csv "$OUT/sweep_$(echo $c | cut -d' ' -f1,2 | tr ' =' '__').csv" > /dev/null 2>> "$OUT/sweep.err"
done
cat "$OUT"/sweep_*.csv | grep "expand m" | cut -d, -f1,2,4 | sort -t, -k1,1 -k3,3g
