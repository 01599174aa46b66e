#!/usr/bin/env bash
# Installs what accelerate-cpp needs from Debian 12's archive; installs nothing already present.
set -euo pipefail
packages=(
  build-essential cmake            # compiler and build system
  libtorch-dev                     # LibTorch 1.13 (CPU) with c10d
  libgloo-dev                      # headers that c10d's ProcessGroupGloo.hpp includes
  libopenblas0-pthread             # fast BLAS: LibTorch otherwise uses the slow reference BLAS
  libcli11-dev                     # the `accelerate` command line
  nlohmann-json3-dev               # safetensors headers, checkpoint markers (JSON)
  libyaml-cpp-dev                  # `accelerate config` files (YAML, as Python Accelerate writes them)
  libprotobuf-dev protobuf-compiler # TensorBoard event files (Event/Summary protobufs)
  python3-protobuf                 # tests read our TensorBoard files back with an independent reader
  libgtest-dev                     # tests
  clang-format                     # formatting check in CI
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo_cmd apt-get update -qq
  $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian picks the libblas.so.3 alternative by priority; OpenBLAS outranks the reference BLAS,
# but say which one LibTorch will get so a slow machine is easy to explain.
blas=$(readlink -f /usr/lib/x86_64-linux-gnu/libblas.so.3 2>/dev/null || true)
echo "BLAS in use: ${blas:-unknown}"
