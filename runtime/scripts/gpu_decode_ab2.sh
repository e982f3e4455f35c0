#!/usr/bin/env bash
# Run 36 (2026-11-23): the decode expand with y's loads ahead of the multiply and the shrink's
# paired K steps limited to tiles of up to 8 sums, on CUDA (tests), then the decode A/B of
# run 35 again (new binaries against devbin/old/, built at 381c54c), two alternating rounds.
#   run(command="bash runtime/scripts/gpu_decode_ab2.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
echo "== CUDA tests (one process each) =="
run_cuda_tests 200 cuda_bf16::segmented_expand cuda_f32::segmented_expand cuda_bf16::segmented_shrink \
    cuda_f32::segmented_shrink cuda_bf16::fused_decode cuda_bf16::chunked_prefill
# One file for all test logs: the device tool returns only a few files.
for f in "$OUT"/cuda_*.log; do echo "=== $f"; cat "$f"; done > "$OUT/cuda_tests.txt"
rm -f "$OUT"/cuda_*.log
cases="qkv R=64 T=8 adapters=8,qkv R=64 T=32 adapters=8,mla_qkv_a R=64 T=8 adapters=8,mla_qkv_a R=64 T=32 adapters=8"
cases="$cases,gate_up R=64 T=8 adapters=8,gate_up R=64 T=32 adapters=8,qkv R=16 T=32 adapters=8,gate_up R=16 T=32 adapters=8"
cases="$cases,qkv R=64 T=128 adapters=8,gate_up R=64 T=128 adapters=8"
for round in 1 2; do
    for build in new old; do
        bin=devbin/lora_bench
        [ "$build" = old ] && bin=devbin/old/lora_bench
        timeout 100 "$bin" --case "$cases" --csv "$OUT/tmp.csv" > /dev/null 2>> "$OUT/bench.err"
        echo "round $round $build rc=$?" | tee -a "$OUT/bench.err"
        grep -v "^#" "$OUT/tmp.csv" | grep -v "^case" | grep -v "^moe" | grep -v ",fused," | sed "s/^/$round,$build,/" \
            | tee -a "$OUT/decode_ab.csv" | cut -d, -f1-7,13
    done
done
rm -f "$OUT/tmp.csv"
