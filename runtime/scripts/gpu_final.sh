#!/usr/bin/env bash
# Run 42 (2026-11-23): the final binaries (5b3d0ac: 8x8 shrink tiles only past 128-token
# segments, 256 shrink threads at most). CUDA tests of the paths the session touched, then the
# decode cases runs 39-41 compared, once.
#   run(command="bash runtime/scripts/gpu_final.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
run_cuda_tests 150 cuda_bf16::segmented_shrink cuda_f32::segmented_shrink cuda_bf16::fused_decode cuda_f32::fused_decode \
    cuda_graph_decode_bf16 cuda_graph_decode_f32 cuda_bf16::segmented_expand cuda_bf16::chunked_prefill
run_bench 200 final "^qkv R=16 T=32 adapters=8,^qkv R=64 T=8 adapters=8,^qkv R=64 T=32 adapters=8,^qkv R=64 T=128 adapters=8,^gate_up R=64 T=8 adapters=8,^gate_up R=64 T=32 adapters=8,^mla_qkv_a R=64 T=8 adapters=8,^mla_qkv_a R=64 T=32 adapters=8" \
    | grep -v "fused\|per pair\|pdl"
cd "$OUT" && { for f in cuda_*.log; do echo "== $f"; cat "$f"; done > tests.txt; rm -f cuda_*.log; }
