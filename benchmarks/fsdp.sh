#!/usr/bin/env bash
# Every part of bench_fsdp (full parameter sharding), as benchmarks/README.md reports it.
#
#   benchmarks/fsdp.sh BUILD_DIR [--budget BUDGET_MB]
#
# memory with 2, 3 and 4 processes; step time with 2. With --budget, also the memory budget with
# 4 processes under FULL_SHARD (must train) and plain data parallelism (must be stopped by the
# budget); each run is capped at 5 minutes.
set -uo pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
  sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
build_dir=$1
budget=
if [[ ${2:-} == --budget ]]; then budget=${3:-250}; fi
cli=$build_dir/bin/accelerate
bench=$build_dir/benchmarks/bench_fsdp
status=0
for n in 2 3 4; do
  "$cli" launch -n "$n" "$bench" --part memory || status=1
done
"$cli" launch -n 2 "$bench" --part time || status=1
if [[ -n $budget ]]; then
  timeout 300 "$cli" launch -n 4 "$bench" --part budget --budget_mb "$budget" || status=1
  if timeout 300 "$cli" launch -n 4 "$bench" --part budget --budget_mb "$budget" --ddp; then
    echo "fsdp.sh: plain data parallelism trained within the budget: the budget proves nothing" >&2
    status=1
  else
    echo "fsdp.sh: as expected, plain data parallelism does not fit the budget"
  fi
fi
exit $status
