#!/usr/bin/env bash
# The grouping launch's cost on CUDA: MoE cases whose "grouped" and "grouped on device" rows
# differ by it (run 30: 7.6 µs at T = 1, 21 µs at T = 1024), after the grouped tests. Run 32
# used it on a kernel change that did not lower that cost and was reverted.
#   run(command="bash runtime/scripts/gpu_moe_align.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
echo "== CUDA tests (one process each) =="
run_cuda_tests 200 cuda_bf16::moe_grouped cuda_f32::moe_grouped
echo "== MoE cases =="
cases="moe_gate_up R=16 T=1 adapters=1,moe_gate_up R=16 T=128,moe_gate_up R=16 T=1024,moe_gate_up R=64 T=1024"
cases="$cases,moe_down R=64 T=1024,moe_down_per_pair R=64 T=1024"
run_bench 300 moe_align "$cases"
