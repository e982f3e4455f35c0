#!/usr/bin/env bash
# Runs on the device machine (lora_bench in devbin/): the T = 128 rank-64 decode cases whose
# default pair for a caller with room for copies splits K ("graph splitk default"), now also
# under programmatic launch with the largest shared-memory carveout ("... pdl carveout"),
# against the default pairs' "graph pdl" and "graph pdl carveout" rows; two rounds.
source "$(dirname "$0")/gpu_env.sh"
for f in devbin/*.xz; do [ -e "${f%.xz}" ] || xz -dk "$f"; done
for round in 1 2; do
    echo "== round $round =="
    run_bench 240 splitk_carveout$round "^qkv R=64 T=128 ,^gate_up R=64 T=128 ,^mla_qkv_a R=64 T=128 " | grep "graph\(,\| pdl\| splitk\)"
done
