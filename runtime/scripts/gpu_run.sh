#!/usr/bin/env bash
# Runs on the device machine (no Rust toolchain there): the CUDA kernel tests and the benchmark
# from prebuilt, stripped binaries in devbin/, the PyTorch baseline, and a summary table.
#
# Build here first:
#   export CARGO_TARGET_DIR=$PWD/target-rt
#   cargo test -p lorac-runtime --release --features cuda-tests --no-run   # -> deps/kernels-*
#   cargo build -p lorac-runtime --release --bin lora_bench
#   mkdir -p devbin && cp <kernels test binary> devbin/kernels && cp $CARGO_TARGET_DIR/release/lora_bench devbin/
#   strip devbin/*
# then: run(command="bash runtime/scripts/gpu_run.sh", carry=["devbin"]).
# Extra arguments are passed to lora_bench (e.g. --quick). Set SKIP_TESTS=1 / SKIP_TORCH=1 /
# NCU=1 to leave out or add steps.
set -uo pipefail
OUT=${OUT:-/tmp/lora_out}
mkdir -p "$OUT"
if [ -z "${CUDA_PATH:-}" ]; then
    if [ -d /usr/local/cuda ]; then CUDA_PATH=/usr/local/cuda; else CUDA_PATH=$(dirname "$(dirname "$(command -v nvcc)")"); fi
fi
export CUDA_PATH
export LD_LIBRARY_PATH="$CUDA_PATH/lib64:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"

if [ -z "${SKIP_TESTS:-}" ]; then
    echo "== CUDA kernel tests (f32 and bf16) =="
    devbin/kernels cuda_ 2>&1 > "$OUT/cuda_tests.log"
    grep -E "^test |test result" "$OUT/cuda_tests.log"
fi

echo "== lora_bench =="
devbin/lora_bench --csv "$OUT/bench.csv" "$@" 2> "$OUT/bench.err" | grep "^#"
tail -3 "$OUT/bench.err"

if [ -z "${SKIP_TORCH:-}" ]; then
    echo "== PyTorch baseline =="
    python3 runtime/scripts/torch_lora_baseline.py --csv "$OUT/torch.csv" > /dev/null 2> "$OUT/torch.err" || tail -5 "$OUT/torch.err"
fi

if [ -n "${NCU:-}" ]; then
    echo "== ncu kernel durations (one pass, cold caches) =="
    timeout 240 ncu --csv --metrics gpu__time_duration.sum devbin/lora_bench --profile-pass --quick > "$OUT/ncu.csv" 2>/dev/null
    python3 - "$OUT/ncu.csv" <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
hdr = rows[0]; rows = rows[1:]
ki, vi = hdr.index("Kernel Name"), hdr.index("Metric Value")
d = collections.defaultdict(list)
for r in rows:
    d[r[ki].split("(")[0][:40]].append(float(r[vi].replace(",", "")) / 1e3)
for k, v in d.items():
    v.sort(); print(f"{k}: n={len(v)} min {v[0]:.2f} median {v[len(v)//2]:.2f} max {v[-1]:.2f} us")
PY
fi

echo "== summary =="
python3 runtime/scripts/summarize.py "$OUT/bench.csv" "$OUT/torch.csv" | tee "$OUT/summary.md"
