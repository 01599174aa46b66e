// libFuzzer entry point for the safetensors parser: every input must either load or throw, never
// crash, leak or read out of bounds. Not built by CMake; `fuzz/run.sh [seconds]` builds it, writes
// a seed corpus of valid files and runs it. By hand, from the repository root (-std=c++17:
// clang 14 rejects LibTorch 1.13's headers in C++20 mode):
//
//   clang++ -std=c++17 -g -O1 -fsanitize=fuzzer,address,undefined \
//     -fno-sanitize-recover=undefined -D_GLIBCXX_USE_CXX11_ABI=1 \
//     -Iinclude -isystem /usr/include/torch/csrc/api/include \
//     fuzz/safetensors_fuzz.cpp src/safetensors.cpp src/detail/file_mapping.cpp \
//     src/detail/checksum.cpp \
//     -ltorch -ltorch_cpu -lc10 \
//     -o /tmp/fuzz/safetensors_fuzz
//   mkdir -p /tmp/fuzz/corpus && /tmp/fuzz/safetensors_fuzz /tmp/fuzz/corpus /tmp/fuzz/seeds \
//     -max_len=4096 -timeout=10 -dict=fuzz/safetensors.dict
//
// (LibTorch itself is not instrumented; only our parser is.)

#include <accelerate/safetensors.h>

#include <c10/util/Exception.h>

#include <cstddef>
#include <cstdint>
#include <exception>
#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  try {
    const auto file = accelerate::safetensors::deserialize(bytes);
    // Touch every element so that a tensor claiming more bytes than it owns would be caught.
    for (const auto& item : file.tensors) {
      (void)item.second.sum();
    }
  } catch (const c10::Error&) {
    // Rejected input: the expected outcome for most of the corpus.
  } catch (const std::exception&) {
    // Allocation failures and the like are errors, not crashes.
  }
  return 0;
}
