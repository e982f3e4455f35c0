#!/usr/bin/env bash
# Run 48 (2026-11-23): where the decode shrink and expand spend their time. Nsight Compute on
# one profiling pass of qkv R=16 T=32 (8 adapters) and qkv R=64 T=8 with warm caches and
# unlocked clocks (what a serving loop sees), full set: the details page (stall reasons,
# occupancy, memory) and the per-SASS-instruction stall samples of each kernel.
#   run(command="bash runtime/scripts/gpu_profile.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
ncu --version | tail -1
for c in "qkv R=16 T=32 adapters=8" "qkv R=64 T=8 adapters=8"; do
    tag=$(echo "$c" | tr -c 'A-Za-z0-9' '_')
    timeout 200 ncu --cache-control none --clock-control none --set full -k regex:"shrink|expand" --launch-skip 2 -c 2 \
        -o "$OUT/$tag" -f "${LORA_BENCH:-devbin/prev/lora_bench}" --profile-pass --case "^$c" > "$OUT/${tag}_run.txt" 2>&1
    echo "$c: ncu rc=$?"
    ncu --import "$OUT/$tag.ncu-rep" --page details --csv > "$OUT/${tag}_details.csv" 2>&1
    ncu --import "$OUT/$tag.ncu-rep" --page source --csv --print-source sass > "$OUT/${tag}_sass.csv" 2>&1
    rm -f "$OUT/$tag.ncu-rep"
done
cd "$OUT" && { for f in *_run.txt; do echo "== $f"; tail -20 "$f"; done > runs.txt; rm -f ./*_run.txt; ls -la; }
