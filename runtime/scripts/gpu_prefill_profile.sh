#!/usr/bin/env bash
# Run 57 (2026-11-24): what bounds the prefill kernels after runs 54-56 showed that the shrink
# does not speed up with more cubes. Nsight Compute, full set, on the third launch of the
# default tensor-core shrink and of the default expand of qkv R=16 and mla_qkv_a R=64 at
# T = 4096 (8 adapters); caches flushed before each kernel (prefill streams from HBM),
# unlocked clocks. Details page (throughputs, occupancy, stall reasons) per kernel.
#   run(command="bash runtime/scripts/gpu_prefill_profile.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
ncu --version | tail -1
for c in "qkv R=16 T=4096 adapters=8" "mla_qkv_a R=64 T=4096 adapters=8"; do
    for k in shrink_mma expand_mma; do
        tag=$(echo "$c $k" | tr -c 'A-Za-z0-9' '_')
        timeout 240 ncu --cache-control all --clock-control none --set full -k regex:"$k" --launch-skip 2 -c 1 \
            -o "$OUT/$tag" -f devbin/lora_bench --profile-pass --no-graphs --variant none --case "^$c" > "$OUT/${tag}_run.txt" 2>&1
        echo "$c $k: ncu rc=$?"
        ncu --import "$OUT/$tag.ncu-rep" --page details --csv > "$OUT/${tag}_details.csv" 2>&1
        rm -f "$OUT/$tag.ncu-rep"
    done
done
cd "$OUT" && { for f in *_run.txt; do echo "== $f"; tail -20 "$f"; done > runs.txt; rm -f ./*_run.txt; ls -la; }
