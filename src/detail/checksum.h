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
#include <functional>
#include <map>
#include <memory>
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

/// A CRC32C extended on a second thread while the calling thread does something else with the
/// same bytes: write_file_atomically_with hashes each piece while write() copies it into the
/// page cache, so that a checksum costs little more than the write when a core is free. The
/// thread starts with the first large piece and stops with the object; pieces below
/// kOverlapMinBytes (and every piece on a single-core machine) are hashed on the calling
/// thread, where handing them over would cost more than hashing them.
///
/// Example:
///   detail::OverlappedCrc32c crc;
///   for (const auto& [data, size] : pieces) {
///     crc.update_during(data, size, [&] { write_all(fd, data, size); });
///   }
///   const uint32_t sum = crc.value();  // crc32c(0, <all pieces>)
class OverlappedCrc32c {
 public:
  static constexpr size_t kOverlapMinBytes = size_t{256} << 10;

  OverlappedCrc32c();
  ~OverlappedCrc32c();
  OverlappedCrc32c(const OverlappedCrc32c&) = delete;
  OverlappedCrc32c& operator=(const OverlappedCrc32c&) = delete;

  /// Extends the CRC with `size` bytes at `data` while `work()` runs on this thread. Returns,
  /// or rethrows what `work` threw, only once the bytes are hashed: `data` need live only for
  /// the call.
  void update_during(const void* data, size_t size, const std::function<void()>& work);
  /// The CRC32C of every byte passed so far, in order.
  uint32_t value() const { return crc_; }

 private:
  struct Worker;
  std::unique_ptr<Worker> worker_;
  uint32_t crc_ = 0;
};

/// Where safetensors::detail::write_file_atomically_with records the CRC32C of each file it
/// writes on this thread (keyed by the path it was given), or null for nowhere. save_state
/// points it at a map for the files it writes, so that only other processes' files need to be
/// read back.
std::map<std::string, uint32_t>*& checksum_sink();

/// Where save_model asks safetensors::detail::save_file_streaming, on this thread, for the
/// CRC32C of a file's data buffer in the file's own metadata: under this key (null: not asked).
/// The header is written first with 8 zero digits there, the data hashed as it is written
/// (OverlappedCrc32c), and the header rewritten in place with the sum before the fsync; the
/// temporary file is renamed only after that, so no reader sees the zeros.
const char*& data_checksum_key();

/// The 8 lower-case hex digits the checkpoint files store, and back (false, `crc` untouched,
/// when `text` is not exactly that).
std::string crc32c_hex(uint32_t crc);
bool parse_crc32c_hex(const std::string& text, uint32_t* crc);

}  // namespace accelerate::detail
