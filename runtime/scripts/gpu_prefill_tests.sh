#!/usr/bin/env bash
# The CUDA prefill tests, one process per test so each log shows whether that test finished:
# each lowers every tensor-core (bf16) or emulated (f32) configuration for each random layout,
# one NVRTC compile apiece, so they take minutes. Binaries as in gpu_run.sh, in devbin/:
#   run(command="bash runtime/scripts/gpu_prefill_tests.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
LIMIT=${LIMIT:-570}
run_cuda_tests "$LIMIT" cuda_bf16::prefill_shrink cuda_bf16::prefill_expand cuda_f32::prefill_shrink cuda_f32::prefill_expand
