#!/usr/bin/env bash
set -uo pipefail
mkdir -p "$OUT"
export CUDA_PATH=${CUDA_PATH:-/usr/local/cuda}
export LD_LIBRARY_PATH="$CUDA_PATH/lib64:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
B=devbin/k/lora_bench
SECT="--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy --section LaunchStats --section SchedulerStats"
NCU="ncu --clock-control none --cache-control none"
summ() { grep -E "^  [a-z_]+.*\(|Duration|Memory Throughput|DRAM Throughput|Stall|Warp Cycles Per Issued|Achieved Occupancy|Registers Per|Dynamic Shared|Block Size|Grid Size|Issue Slots Busy|One or More Eligible|Active Warps Per" "$1" | head -60; }
echo "== prefill shrink_mma + expand_mma (qkv R16 T4096, defaults) =="
timeout 120 $NCU -k regex:"shrink_mma|expand_mma" --launch-count 2 $SECT $B --profile-pass --case "qkv R=16 T=4096" > "$OUT/ncu_prefill.txt" 2>&1
summ "$OUT/ncu_prefill.txt"
echo "== decode qkv R16 T32 8 adapters: all kernels with sections =="
timeout 120 $NCU -k regex:"shrink|expand" --launch-count 2 $SECT $B --profile-pass --case "qkv R=16 T=32 adapters=8" > "$OUT/ncu_decode.txt" 2>&1
summ "$OUT/ncu_decode.txt"
echo "== decode device durations per case (warm L2, real clocks; us) =="
for c in "qkv R=16 T=32 adapters=8" "qkv R=16 T=1 adapters=1" "qkv R=64 T=8 adapters=8" "qkv R=64 T=32 adapters=8" "qkv R=64 T=128 adapters=8" "gate_up R=64 T=32 adapters=8" "mla_qkv_a R=64 T=32 adapters=8"; do
  f="$OUT/ncu_$(echo $c | tr ' =' '__').csv"
  timeout 100 $NCU --csv --metrics gpu__time_duration.sum $B --profile-pass --case "$c" > "$f" 2>/dev/null
  python3 - "$f" "$c" <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
if not rows: print(sys.argv[2], "no data"); sys.exit()
hdr = rows[0]; rows = rows[1:]
ki, vi = hdr.index("Kernel Name"), hdr.index("Metric Value")
d = collections.defaultdict(list)
for r in rows:
    d[r[ki].split("(")[0].split("<")[0][-28:]].append(float(r[vi].replace(",", "")) / 1e3)
print(sys.argv[2] + ": " + "; ".join(f"{k} n={len(v)} med {sorted(v)[len(v)//2]:.2f} min {min(v):.2f}" for k, v in d.items()))
PY
done
