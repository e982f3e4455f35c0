#!/usr/bin/env bash
# Run 44 (2026-11-23): the decode shrink on 128 threads for grids of six or more cubes per
# multiprocessor, A/B against the previous final binaries (5b3d0ac, devbin/prev/), alternating,
# two rounds: the T = 128 cases it changes and three T <= 32 cases it must leave alone.
#   run(command="bash runtime/scripts/gpu_threads128.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
cases="^qkv R=16 T=128 ,^qkv R=64 T=128 ,^gate_up R=16 T=128 ,^gate_up R=64 T=128 ,^mla_qkv_a R=16 T=128 ,^mla_qkv_a R=64 T=128 "
cases="$cases,^qkv R=16 T=32 adapters=8,^gate_up R=64 T=32 adapters=8,^mla_qkv_a R=64 T=32 adapters=8"
run_ab 100 "" "$cases" 1 2 | grep -E ",segmented,|,graph,"
cd "$OUT" && { for f in prev1 new1 prev2 new2; do echo "== $f"; cat "$f.csv"; done > ab.txt; cat ./*.err > bench_err.txt; rm -f prev?.csv new?.csv ./*.err; }
