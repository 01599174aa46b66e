#!/usr/bin/env bash
# Builds and runs the consumer project (tests/consumer/) against accelerate-cpp, as a user would.
#
#   run.sh package      <accelerate-build-dir> <work-dir>
#       cmake --install <accelerate-build-dir> --prefix <work-dir>/prefix, checks what was
#       installed (library, headers, package config, `accelerate`, `accelerate-test-script`),
#       runs the installed `accelerate env` and `accelerate test`, then configures the consumer
#       with CMAKE_PREFIX_PATH=<work-dir>/prefix (find_package), builds it from scratch and runs
#       it.
#       Also configures it once against the build tree's export (accelerate_DIR=<build-dir>).
#   run.sh subdirectory <accelerate-source-dir> <work-dir>
#       Configures the consumer with add_subdirectory(<source-dir>) and every accelerate option at
#       its default, builds only the `consumer` target (the library and nothing else of
#       accelerate-cpp's), and runs it. <work-dir> is kept between runs, so after the first
#       (a full library build, minutes) only what changed is rebuilt.
#   run.sh no-tools     <accelerate-source-dir> <work-dir>
#       Configures accelerate-cpp itself with ACCELERATE_BUILD_TOOLS=OFF while CLI11 and yaml-cpp
#       are made unfindable (CMAKE_DISABLE_FIND_PACKAGE_*): the library alone must not need them.
#       Then checks that asking for the tests without the tools stops with a message naming the
#       option. Configure only: seconds.
#
# Environment: CONSUMER_GENERATOR, CONSUMER_CXX_COMPILER, CONSUMER_BUILD_TYPE (consumer.cmake
# passes those of the outer build), CONSUMER_CMAKE_ARGS (more configure arguments, split on
# spaces), CONSUMER_JOBS (parallel build jobs; default: nproc).
set -euo pipefail

mode=${1:?usage: run.sh package|subdirectory|no-tools <accelerate-build-or-source-dir> <work-dir>}
accelerate=$(cd "${2:?missing accelerate directory}" && pwd)
work=${3:?missing work directory}
here=$(cd "$(dirname "$0")" && pwd)
jobs=${CONSUMER_JOBS:-$(nproc)}
extra=()
[[ -n ${CONSUMER_GENERATOR:-} ]] && extra+=(-G "$CONSUMER_GENERATOR")
[[ -n ${CONSUMER_CXX_COMPILER:-} ]] && extra+=("-DCMAKE_CXX_COMPILER=$CONSUMER_CXX_COMPILER")
[[ -n ${CONSUMER_BUILD_TYPE:-} ]] && extra+=("-DCMAKE_BUILD_TYPE=$CONSUMER_BUILD_TYPE")
read -r -a more <<<"${CONSUMER_CMAKE_ARGS:-}"
extra+=("${more[@]}")
mkdir -p "$work"
work=$(cd "$work" && pwd)

step() { echo "consumer($mode): $*"; }
fail() {
  echo "consumer($mode): FAILED: $*" >&2
  exit 1
}

case $mode in
package)
  prefix=$work/prefix
  build=$work/build
  rm -rf "$prefix" "$build" "$work/build-tree"
  step "cmake --install $accelerate --prefix $prefix"
  cmake --install "$accelerate" --prefix "$prefix" >"$work/install.log" ||
    fail "install failed: $(cat "$work/install.log")"
  libdir=$(sed -n 's/^CMAKE_INSTALL_LIBDIR:PATH=//p' "$accelerate/CMakeCache.txt")
  libdir=${libdir:-lib}
  for file in "$libdir/cmake/accelerate/accelerateConfig.cmake" \
    "$libdir/cmake/accelerate/accelerateConfigVersion.cmake" \
    "$libdir/cmake/accelerate/accelerateTargets.cmake" include/accelerate/accelerate.h \
    include/accelerate/safetensors.h bin/accelerate bin/accelerate-test-script; do
    [[ -e $prefix/$file ]] || fail "not installed: $file"
  done
  ls "$prefix/$libdir"/libaccelerate.* >/dev/null 2>&1 || fail "not installed: the library"
  # The installed command finds the installed test script beside it, and `accelerate test`
  # (one process, a few seconds) runs it end to end.
  "$prefix/bin/accelerate" env >"$work/env.log" 2>&1 ||
    fail "the installed 'accelerate env' failed: $(cat "$work/env.log")"
  grep -qF "$prefix/bin/accelerate-test-script" "$work/env.log" ||
    fail "the installed 'accelerate env' does not list the installed test script:" \
      "$(cat "$work/env.log")"
  step "$prefix/bin/accelerate test"
  (cd "$work" && "$prefix/bin/accelerate" test >"$work/accelerate-test.log" 2>&1) ||
    fail "the installed 'accelerate test' failed: $(cat "$work/accelerate-test.log")"

  # The build tree's own export (accelerate_DIR=<build-dir>; under a parent project, the
  # subdirectory where accelerate-cpp's config was written: CONSUMER_EXPORT_DIR).
  export_dir=${CONSUMER_EXPORT_DIR:-$accelerate}
  step "configure against the build tree's export (accelerate_DIR=$export_dir)"
  cmake -S "$here" -B "$work/build-tree" -DCONSUMER_MODE=package -Daccelerate_DIR="$export_dir" \
    -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF "${extra[@]}" >"$work/build-tree.log" 2>&1 ||
    fail "configure against the build tree failed: $(cat "$work/build-tree.log")"

  step "configure with CMAKE_PREFIX_PATH=$prefix"
  cmake -S "$here" -B "$build" -DCONSUMER_MODE=package -DCMAKE_PREFIX_PATH="$prefix" \
    -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF "${extra[@]}"
  found=$(sed -n 's/^accelerate_DIR:PATH=//p' "$build/CMakeCache.txt")
  [[ $found == "$prefix"/* ]] || fail "find_package(accelerate) found $found, not the install"
  ;;
subdirectory)
  build=$work/build
  # A fresh cache, so that every option takes its default again; object files are kept.
  rm -f "$build/CMakeCache.txt"
  step "configure with add_subdirectory($accelerate)"
  cmake -S "$here" -B "$build" -DCONSUMER_MODE=subdirectory -DACCELERATE_SOURCE_DIR="$accelerate" \
    "${extra[@]}"
  ;;
no-tools)
  build=$work/build-no-tools
  rm -rf "$build"
  step "configure $accelerate with ACCELERATE_BUILD_TOOLS=OFF, without CLI11 and yaml-cpp"
  cmake -S "$accelerate" -B "$build" -DACCELERATE_BUILD_TOOLS=OFF -DACCELERATE_BUILD_TESTS=OFF \
    -DACCELERATE_BUILD_EXAMPLES=OFF -DACCELERATE_BUILD_BENCHMARKS=OFF \
    -DCMAKE_DISABLE_FIND_PACKAGE_CLI11=ON -DCMAKE_DISABLE_FIND_PACKAGE_yaml-cpp=ON \
    "${extra[@]}" >"$work/no-tools.log" 2>&1 ||
    fail "the library alone does not configure without CLI11 and yaml-cpp: $(cat "$work/no-tools.log")"
  grep -q '^ACCELERATE_BUILD_TOOLS:BOOL=OFF' "$build/CMakeCache.txt" ||
    fail "ACCELERATE_BUILD_TOOLS=OFF did not reach the cache"
  rm -rf "$build"
  step "ACCELERATE_BUILD_TOOLS=OFF with the tests on must be refused"
  if cmake -S "$accelerate" -B "$build" -DACCELERATE_BUILD_TOOLS=OFF -DACCELERATE_BUILD_TESTS=ON \
    "${extra[@]}" >"$work/no-tools-tests.log" 2>&1; then
    fail "ACCELERATE_BUILD_TOOLS=OFF with ACCELERATE_BUILD_TESTS=ON configured"
  fi
  grep -q "ACCELERATE_BUILD_TOOLS=OFF needs ACCELERATE_BUILD_TESTS=OFF" "$work/no-tools-tests.log" ||
    fail "the refusal does not name the options: $(cat "$work/no-tools-tests.log")"
  rm -rf "$build"
  step "OK"
  exit 0
  ;;
*)
  fail "unknown mode '$mode' (package, subdirectory or no-tools)"
  ;;
esac

step "build"
cmake --build "$build" --target consumer -j"$jobs"
step "run"
"$build/consumer" "$work"
