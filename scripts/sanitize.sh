#!/usr/bin/env bash
# Builds everything with AddressSanitizer + UndefinedBehaviorSanitizer (or the list in
# $ACCELERATE_SANITIZE) and runs the whole test suite under them, the programs the launch tests
# start through `accelerate launch` included.
#
# Usage: scripts/sanitize.sh [build-dir] [extra ctest arguments...]
#   scripts/sanitize.sh                        # build-asan, every test
#   scripts/sanitize.sh build-asan -R Safetensors
#   ACCELERATE_TEST_FILTER='safetensors|data' ACCELERATE_BUILD_EXAMPLES=OFF scripts/sanitize.sh
#       builds only the test files whose path matches (tests/CMakeLists.txt), without the
#       examples (which only the launch tests run): a much shorter build.
#
# Every sanitizer report goes to <build-dir>/sanitizer-logs/<tool>.<pid> (also from child
# processes, whose stderr a test may swallow); the script prints them at the end and fails if
# there are any. Known leaks inside LibTorch/Gloo are suppressed by scripts/lsan.supp, each entry
# with the reason it is not ours.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
build=${1:-build-asan}
shift || true
sanitizers=${ACCELERATE_SANITIZE:-address,undefined}
jobs=${JOBS:-$(nproc)}

start=$(date +%s)
# Examples are built because the launch tests run them; benchmarks are not tests.
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DACCELERATE_SANITIZE="$sanitizers" \
  -DACCELERATE_BUILD_TESTS=ON -DACCELERATE_BUILD_EXAMPLES="${ACCELERATE_BUILD_EXAMPLES:-ON}" \
  -DACCELERATE_BUILD_BENCHMARKS=OFF -DACCELERATE_TEST_FILTER="${ACCELERATE_TEST_FILTER:-}"
cmake --build "$build" -j"$jobs"
built=$(date +%s)
echo "sanitize.sh: build took $((built - start)) s"

logs=$root/$build/sanitizer-logs
rm -rf "$logs"
mkdir -p "$logs"
# halt_on_error: the first report ends the process (and fails its test).
# detect_leaks: LeakSanitizer at exit; LibTorch's own leaks are suppressed (lsan.supp).
# detect_stack_use_after_return / check_initialization_order / strict_init_order: the checks
#   that are off by default but cheap enough for a test suite.
# log_path: one file per process, so reports from launched workers are not lost.
asan=(halt_on_error=1 detect_leaks=1 detect_stack_use_after_return=1
  check_initialization_order=1 strict_init_order=1 "log_path=$logs/asan")
lsan=("suppressions=$root/scripts/lsan.supp" print_suppressions=0)
ubsan=(halt_on_error=1 print_stacktrace=1 "suppressions=$root/scripts/ubsan.supp"
  "log_path=$logs/ubsan")
# Options already in the environment come last and so win.
join() {
  local IFS=:
  echo "$*"
}
export ASAN_OPTIONS=$(join "${asan[@]}" ${ASAN_OPTIONS:+"$ASAN_OPTIONS"})
export LSAN_OPTIONS=$(join "${lsan[@]}" ${LSAN_OPTIONS:+"$LSAN_OPTIONS"})
export UBSAN_OPTIONS=$(join "${ubsan[@]}" ${UBSAN_OPTIONS:+"$UBSAN_OPTIONS"})

# consumer.subdirectory (label subproject) builds a second, unsanitized copy of the library for
# a packaging check: minutes of build time that find nothing here.
status=0
(cd "$build" && ctest --output-on-failure --timeout 600 -j"$jobs" -LE subproject "$@") ||
  status=$?
tested=$(date +%s)
echo "sanitize.sh: tests took $((tested - built)) s (ctest exit status $status)"

reports=("$logs"/*)
if [[ -e ${reports[0]} ]]; then
  echo "sanitize.sh: ${#reports[@]} sanitizer report(s):"
  for report in "${reports[@]}"; do
    echo "==== $report"
    cat "$report"
  done
  status=1
else
  echo "sanitize.sh: no sanitizer reports"
fi
exit "$status"
