#pragma once
// CRC32C (Castagnoli) of checkpoint files: what save_state records in its marker and save_model
// in its metadata, so that loading can refuse a corrupted file instead of training on it.
//
// CRC32C rather than xxHash64: SSE4.2 computes it in hardware on every x86-64 machine we run
// on (table-driven slicing-by-8 elsewhere), it needs no new dependency, and 32 bits detect any
// burst error up to 32 bits and random corruption with probability 1 - 2^-32
// (benchmarks/README.md has the measured throughput of both).

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>

namespace accelerate::detail {

/// Extends `crc` (0 to start) with `size` bytes; the hardware instruction when the CPU has it.
uint32_t crc32c(uint32_t crc, const void* data, size_t size);
/// The table-driven implementation, whatever the CPU (for tests and the benchmark).
uint32_t crc32c_portable(uint32_t crc, const void* data, size_t size);
/// True when crc32c uses the CPU's instruction.
bool crc32c_is_hardware();

/// CRC32C of `path`'s bytes from `offset` to the end. Errors name the file.
uint32_t crc32c_of_file(const std::string& path, uint64_t offset = 0);

/// Where safetensors::detail::write_file_atomically_with records the CRC32C of each file it
/// writes on this thread (keyed by the path it was given), or null for nowhere. save_state
/// points it at a map for the files it writes, so that only other processes' files need to be
/// read back.
std::map<std::string, uint32_t>*& checksum_sink();

/// The 8 lower-case hex digits the checkpoint files store, and back (false, `crc` untouched,
/// when `text` is not exactly that).
std::string crc32c_hex(uint32_t crc);
bool parse_crc32c_hex(const std::string& text, uint32_t* crc);

}  // namespace accelerate::detail
