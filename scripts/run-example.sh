#!/usr/bin/env bash
# Builds the `accelerate` command and the example, then runs the example as 2 processes.
# Usage: scripts/run-example.sh [num_processes]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-2}
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j"$(nproc)" --target accelerate_cli hello_distributed
build/bin/accelerate launch --num_processes "$n" --rank_prefix build/examples/hello_distributed
