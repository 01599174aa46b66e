#!/usr/bin/env bash
# Builds the `accelerate` command and the training example, then trains it as N processes.
# Usage: scripts/run-example.sh [num_processes] [extra launch options...]
#   e.g. scripts/run-example.sh 2 --mixed_precision bf16 --gradient_accumulation_steps 2
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-2}
shift || true
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j"$(nproc)" --target accelerate_cli train_spirals
build/bin/accelerate launch --num_processes "$n" "$@" build/examples/train_spirals
