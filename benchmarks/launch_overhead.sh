#!/usr/bin/env bash
# What `accelerate launch` costs on top of starting the workers yourself.
#
#   benchmarks/launch_overhead.sh BUILD_DIR [REPEATS=20] [NUM_PROCESSES=2] [PROGRAM=true]
#
# Times `accelerate launch -n N PROGRAM` from start to exit against the baseline of starting
# PROGRAM N times in the background and waiting for all of them, measured alternately in the same
# run so that both see the same machine load. PROGRAM defaults to `true`: the program's own work
# would only dilute the ratio. Prints mean and median per run for both, and the ratio of the means.
set -euo pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
build_dir=$1
repeats=${2:-20}
num_processes=${3:-2}
program=$(type -P "${4:-true}") || { echo "launch_overhead: ${4:-true} not found" >&2; exit 2; }
cli=$build_dir/bin/accelerate
if [[ ! -x $cli ]]; then
  echo "launch_overhead: $cli not found; build the accelerate_cli target first" >&2
  exit 2
fi

# Microseconds since the epoch. $EPOCHREALTIME (bash 5) needs no fork; `date` costs a process start
# per sample, the same on both sides, which only dilutes the ratio.
now_us() {
  if [[ -n ${EPOCHREALTIME:-} ]]; then
    local t=${EPOCHREALTIME/[.,]/}
    echo "$t"
  else
    echo $(($(date +%s%N) / 1000))
  fi
}

run_direct() {
  local i
  for ((i = 0; i < num_processes; ++i)); do "$program" & done
  wait
}

run_launched() {
  # stderr carries the thread-count notice, which is not what we time.
  "$cli" launch -n "$num_processes" "$program" 2>/dev/null
}

# One untimed round each: page cache, dynamic loader caches.
run_direct
run_launched

direct=()
launched=()
for ((r = 0; r < repeats; ++r)); do
  t0=$(now_us)
  run_direct
  t1=$(now_us)
  run_launched
  t2=$(now_us)
  direct+=($((t1 - t0)))
  launched+=($((t2 - t1)))
done

stats() {  # prints "mean median" in milliseconds
  printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1; s += $1 }
    END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2;
          printf "%.3f %.3f\n", s / NR / 1000, m / 1000 }'
}
read -r direct_mean direct_median < <(stats "${direct[@]}")
read -r launched_mean launched_median < <(stats "${launched[@]}")

echo "launch overhead: $num_processes x $program, $repeats repetitions, $(nproc) cores"
printf '  direct (%d background processes + wait): mean %8.3f ms  median %8.3f ms\n' \
  "$num_processes" "$direct_mean" "$direct_median"
printf '  accelerate launch -n %d:                  mean %8.3f ms  median %8.3f ms\n' \
  "$num_processes" "$launched_mean" "$launched_median"
awk -v a="$launched_mean" -v b="$direct_mean" \
  'BEGIN { printf "  ratio launched/direct (means): %.2fx, overhead %.3f ms per launch\n", a / b, a - b }'
