#!/usr/bin/env bash
# Runs on the device machine: the split-K choice for programmatically launched pairs
# (`ShrinkKernel::choose_within_for(.., LaunchMode::Programmatic)`) at T = 32 with 8 adapters
# (4-token segments), where it differs from the plain choice: lora_bench's "graph splitk
# pdl-choice" rows against the default "graph pdl" pair, two rounds, every dense case.
#   run(command="bash runtime/scripts/gpu_pdl_choice.sh", carry=["devbin"])
source "$(dirname "$0")/gpu_env.sh"
for f in devbin/*.xz; do [ -e "${f%.xz}" ] || xz -dk "$f"; done
cases=$(dense_decode_cases_8 32)
for round in 1 2; do
    run_bench 150 "t32_choice$round" "$cases" | grep -E "rc=|graph pdl|pdl-choice" | grep -v carveout
done
