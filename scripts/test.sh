#!/usr/bin/env bash
# Configures, builds and runs every test. Usage: scripts/test.sh [build-dir]
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
jobs=$(nproc)
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DACCELERATE_WERROR=ON
cmake --build "$build" -j"$jobs"
scripts/check-format.sh
cd "$build"
ctest --output-on-failure --timeout 300 -j"$jobs"
