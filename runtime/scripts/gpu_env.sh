# Sourced by the device-machine scripts: strict mode, the output folder ($OUT, which the device
# tool returns), the CUDA libraries cubecl loads, and the GPU's name, driver and clock in
# $OUT/gpu.txt.
set -uo pipefail
OUT=${OUT:-/tmp/lora_out}
mkdir -p "$OUT"
export CUDA_PATH=${CUDA_PATH:-/usr/local/cuda}
export LD_LIBRARY_PATH="$CUDA_PATH/lib64:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
