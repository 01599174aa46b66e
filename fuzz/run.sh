#!/usr/bin/env bash
# Builds the libFuzzer target for the safetensors parser (ASan + UBSan, UBSan findings fatal),
# writes a seed corpus of valid files and runs the fuzzer at low priority.
#
#   fuzz/run.sh [seconds] [workdir]      (defaults: 600 s, /tmp/fuzz)
#
# Run from anywhere; needs clang++ (14 is fine), LibTorch under /usr and python3 for the seeds.
# Findings land in $workdir as crash-*/leak-*/timeout-* files; the exit status is libFuzzer's.
set -euo pipefail

seconds=${1:-600}
work=${2:-/tmp/fuzz}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$work/seeds" "$work/corpus"

cd "$root"
# -std=c++17: clang 14 rejects LibTorch 1.13's headers in C++20 mode.
nice -n 10 clang++ -std=c++17 -g -O1 -fsanitize=fuzzer,address,undefined \
  -fno-sanitize-recover=undefined -D_GLIBCXX_USE_CXX11_ABI=1 \
  -Iinclude -isystem /usr/include/torch/csrc/api/include \
  fuzz/safetensors_fuzz.cpp src/safetensors.cpp src/detail/file_mapping.cpp \
  src/detail/checksum.cpp \
  -ltorch -ltorch_cpu -lc10 \
  -o "$work/safetensors_fuzz"

# Seeds: valid files (8-byte little-endian header length, JSON header padded to 8, data).
python3 - "$work/seeds" <<'PY'
import json, os, struct, sys

out = sys.argv[1]
SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
        "U8": 1, "BOOL": 1}

def file(tensors, metadata=None):
    header, data = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape in tensors:
        n = SIZE[dtype]
        for d in shape:
            n *= d
        payload = bytes((len(data) + i) % 2 for i in range(n))  # 0/1 bytes: valid BOOL too
        header[name] = {"dtype": dtype, "shape": shape,
                        "data_offsets": [len(data), len(data) + n]}
        data += payload
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data

seeds = {
    "empty": file([]),
    "metadata_only": file([], {"format": "pt"}),
    "one_f32": file([("weight", "F32", [2, 2])]),
    "scalar_i64": file([("step", "I64", [])], {"format": "pt"}),
    "mixed": file([("a", "F64", [3]), ("b", "F32", [2, 3]), ("c", "BF16", [4]),
                   ("d", "F16", [1, 2]), ("e", "I32", [2]), ("f", "I16", [3]),
                   ("g", "I8", [5]), ("h", "U8", [0]), ("i", "BOOL", [2, 2])],
                  {"format": "pt", "note": "seed"}),
    "zero_dims": file([("z", "F32", [0, 4]), ("w", "BF16", [1, 1, 1])]),
}
for name, data in seeds.items():
    with open(os.path.join(out, name + ".safetensors"), "wb") as f:
        f.write(data)
PY

exec nice -n 10 "$work/safetensors_fuzz" "$work/corpus" "$work/seeds" \
  -max_total_time="$((seconds + 10))" -max_len=4096 -timeout=10 \
  -dict="$root/fuzz/safetensors.dict" -artifact_prefix="$work/" -print_final_stats=1
