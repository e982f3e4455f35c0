#!/usr/bin/env bash
# Where a prefill tensor-core kernel's warps wait (rank-64 qkv and MLA, T = 4096, 8 adapters,
# the default tile; KERNEL, a regex, picks the kernel: default the expand): Nsight Compute,
# WarpStateStats and related sections, third launch, caches flushed, unlocked clocks; prints
# each stall reason's share (warp cycles per issued instruction) and the kernel's throughputs
# (DRAM, L2, tensor pipe).
#   run 110: run(command="bash runtime/scripts/gpu_expand_profile.sh", carry=["devbin"])
#   run 115: KERNEL=shrink_mma (the shrink)
source "$(dirname "$0")/gpu_env.sh"
KERNEL=${KERNEL:-expand_mma}
for f in devbin/*.xz; do [ -e "${f%.xz}" ] || xz -dk "$f"; done
for c in "qkv R=64 T=4096 adapters=8" "mla_qkv_a R=64 T=4096 adapters=8"; do
  tag=$(echo "$c $KERNEL" | tr -c 'A-Za-z0-9' '_')
  timeout 200 ncu --cache-control all --clock-control none --section SpeedOfLight --section WarpStateStats --section SchedulerStats \
      --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis --section InstructionStats \
      --section ComputeWorkloadAnalysis --metrics sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,lts__t_bytes.sum.per_second \
      -k regex:"$KERNEL" --launch-skip 2 -c 1 -o "$OUT/$tag" -f devbin/lora_bench --profile-pass --no-graphs --variant none --case "^$c" \
      > "$OUT/${tag}_run.txt" 2>&1
  echo "== $c: ncu rc=$?"
  ncu --import "$OUT/$tag.ncu-rep" --page raw --csv > "$OUT/${tag}_raw.csv" 2>&1
  ncu --import "$OUT/$tag.ncu-rep" --page details --csv > "$OUT/${tag}_details.csv" 2>&1
  rm -f "$OUT/$tag.ncu-rep"
  python3 - "$OUT/${tag}_raw.csv" <<'PY'
import csv, sys
rows = list(csv.reader(open(sys.argv[1])))
head = next(i for i, r in enumerate(rows) if r and r[0] == "ID")
names, units, vals = rows[head], rows[head + 1], rows[head + 2]
want = ("issue_stalled", "gpu__time_duration.sum", "dram__throughput.avg.pct", "sm__throughput.avg.pct", "launch__grid_size",
        "launch__block_size", "launch__registers", "smsp__issue_active.avg.pct", "sm__warps_active.avg.pct",
        "sm__pipe_tensor_op_hmma_cycles_active.avg.pct", "lts__t_bytes.sum.per_second", "lts__throughput.avg.pct",
        "smsp__inst_executed.sum", "launch__shared_mem_per_block")
stalls = []
for n, u, v in zip(names, units, vals):
    if "issue_stalled" in n and n.endswith("_per_warp_active.pct"):
        try: stalls.append((float(v.replace(",", "")), n))
        except ValueError: pass
    elif any(w in n for w in want[1:]):
        print(f"{n} = {v} {u}")
for v, n in sorted(stalls, reverse=True)[:12]:
    print(f"{v:7.2f}% {n}")
PY
done
cd "$OUT" && { for f in *_run.txt; do echo "== $f"; tail -8 "$f"; done > runs.txt; rm -f ./*_run.txt; }
