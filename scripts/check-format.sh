#!/usr/bin/env bash
# Fails when a C++ file tracked by git is not clang-formatted.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v clang-format >/dev/null || { echo "clang-format not installed; skipping format check"; exit 0; }
bad=()
while IFS= read -r f; do
  clang-format --dry-run -Werror "$f" >/dev/null 2>&1 || bad+=("$f")
done < <(git ls-files '*.cpp' '*.h' 2>/dev/null || find include src tools tests examples benchmarks -name '*.cpp' -o -name '*.h')
if ((${#bad[@]})); then
  echo "not clang-formatted (run clang-format -i):"; printf '  %s\n' "${bad[@]}"; exit 1
fi
echo "format check: all files clang-formatted"
