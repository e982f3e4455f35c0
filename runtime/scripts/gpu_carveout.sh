#!/usr/bin/env bash
# Run 49 (2026-11-23): every dense decode case (8 adapters) from graphs with the driver's
# shared-memory carveout per kernel ("graph", "graph pdl") and with every kernel on the largest
# carveout ("graph carveout", "graph pdl carveout"), same binary, same run, two rounds.
# The binary had the carveout half of runtime/benchmarks/h100-2026-11-23-kernels-run47-50-latency/run49-50_carveout_and_single_token_expand.patch applied
# to b9a6db2 (GraphBuilder::set_shared_memory_carveout and the two lora_bench rows; dropped).
#   run(command="bash runtime/scripts/gpu_carveout.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
cases=$(dense_decode_cases_8 1 8 32 128)
for round in 1 2; do
    run_bench 200 "carveout$round" "$cases" | grep -E ",graph( pdl)?( carveout)?,"
done
cd "$OUT" && { for f in carveout1 carveout2; do echo "== $f"; cat "$f.csv"; done > carveout.txt; cat ./*.err > bench_err.txt; rm -f carveout?.csv ./*.err; }
