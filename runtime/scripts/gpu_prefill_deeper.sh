#!/usr/bin/env bash
# Run 35 (2026-11-23): the prefill shrink's default tile one pipeline stage deeper, beside the
# default, for qkv and MLA at T = 4096 (each pair row also times the default expand).
#   run(command="bash runtime/scripts/gpu_prefill_deeper.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
for round in 1 2; do
    echo "== round $round =="
    run_bench 200 "prefill_deeper_$round" "qkv R=16 T=4096,qkv R=64 T=4096,mla_qkv_a R=16 T=4096,mla_qkv_a R=64 T=4096" \
        --prefill-only --variant "deeper,w2x4 k64 g2 s3,k256 g4 s2"
done
