#!/usr/bin/env bash
# Run 35 (2026-11-23): decode A/B in one run, three alternating rounds of the new binaries
# (devbin/lora_bench) and the previous ones (devbin/old/lora_bench, built at 381c54c: the
# decode kernels of runs 9-33) on the R=64 decode cases and qkv R=16 T=32; then the prefill
# shrink's default tile one stage deeper. Few output files (the device tool returns about 8).
#   run(command="bash runtime/scripts/gpu_decode_ab.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
# The old binary matches case parts anywhere, so moe_gate_up rides along with gate_up there.
cases="qkv R=64 T=8 adapters=8,qkv R=64 T=32 adapters=8,mla_qkv_a R=64 T=8 adapters=8,mla_qkv_a R=64 T=32 adapters=8"
cases="$cases,gate_up R=64 T=8 adapters=8,gate_up R=64 T=32 adapters=8,qkv R=16 T=32 adapters=8"
for round in 1 2 3; do
    for build in new old; do
        bin=devbin/lora_bench
        [ "$build" = old ] && bin=devbin/old/lora_bench
        timeout 100 "$bin" --case "$cases" --csv "$OUT/tmp.csv" > /dev/null 2>> "$OUT/bench.err"
        echo "round $round $build rc=$?" | tee -a "$OUT/bench.err"
        grep -v "^#" "$OUT/tmp.csv" | grep -v "^case" | grep -v "^moe" | sed "s/^/$round,$build,/" | tee -a "$OUT/decode_ab.csv" | cut -d, -f1-7,13
    done
done
rm -f "$OUT/tmp.csv"
echo "== prefill shrink, default tile one stage deeper =="
timeout 200 devbin/lora_bench --prefill-only --case "qkv R=16 T=4096,qkv R=64 T=4096,mla_qkv_a R=16 T=4096,mla_qkv_a R=64 T=4096" \
    --variant "deeper,w2x4 k64 g2 s3,k256 g4 s2" --csv "$OUT/prefill_deeper.csv" > /dev/null 2>> "$OUT/bench.err"
echo "rc=$?"
grep -v "^#" "$OUT/prefill_deeper.csv" | cut -d, -f1-5,11
