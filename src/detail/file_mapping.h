#pragma once
// Private: tensors that view a memory-mapped file instead of owning a copy of its bytes, and the
// few POSIX file helpers that the safetensors and offload code share with it.
//
// Loading a checkpoint or an offload folder through a mapping costs no copy and no memory until
// a page is touched, and pages the kernel reads once can be dropped again under memory pressure
// (they are clean). The mapping is private and copy-on-write, so code that updates a loaded
// tensor in place (an optimizer step) works and never writes to the file.
//
// Kept C++17-clean: src/safetensors.cpp uses it and is also built alone by the clang fuzzer.

#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace accelerate::detail {

/// `s` between single quotes, the form errors show paths and names in. Not named `quoted`: for a
/// non-const std::string argument, ADL would prefer std::quoted.
std::string in_quotes(const std::string& s);

/// The text of the current errno.
std::string errno_text();

/// Owns a file descriptor (or a negative value from a failed open) and closes it on scope exit.
class FileDescriptor {
 public:
  explicit FileDescriptor(int fd) : fd_(fd) {}
  FileDescriptor(const FileDescriptor&) = delete;
  FileDescriptor& operator=(const FileDescriptor&) = delete;
  ~FileDescriptor();

  int get() const { return fd_; }
  /// Gives up ownership: closing can report a deferred write error, so a writer closes
  /// explicitly and checks.
  int release() {
    const int fd = fd_;
    fd_ = -1;
    return fd;
  }

 private:
  int fd_;
};

/// Opens `path` read-only; errors name the path and the system's reason.
FileDescriptor open_read_only(const std::string& path);

/// The size of the file open as `fd`, refusing anything but a regular file; `path` is for errors.
uint64_t regular_file_size(int fd, const std::string& path);

/// Reads exactly `size` bytes at `offset` of `fd` into `data`, or errors naming `path`.
void read_exact(int fd, char* data, uint64_t size, uint64_t offset, const std::string& path);

/// A private (copy-on-write) read-write mapping of a whole file; unmapped when the last tensor
/// made from it dies.
class FileMapping {
 public:
  /// Takes ownership of `address` (a mapping of `size` bytes, or nullptr when `size` is 0).
  FileMapping(void* address, size_t size, std::string path);
  FileMapping(const FileMapping&) = delete;
  FileMapping& operator=(const FileMapping&) = delete;
  ~FileMapping();

  char* data() const { return static_cast<char*>(address_); }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  void* address_;
  size_t size_;
  std::string path_;
};

/// Maps the regular file at `path`. Errors name the path and the system's reason; a 0-byte file
/// gives an empty mapping (mmap refuses a zero length).
std::shared_ptr<FileMapping> map_file(const std::string& path);

/// A contiguous CPU tensor of `shape` and `dtype` viewing [offset, offset + numel * itemsize) of
/// the mapping, without a copy; its storage owns exactly that range and keeps the mapping alive.
/// Errors when the range is outside the file or its start is not aligned for `dtype`.
at::Tensor mapped_tensor(const std::shared_ptr<FileMapping>& mapping, uint64_t offset,
                         at::IntArrayRef shape, at::ScalarType dtype);

/// Whether `t`'s storage was made by mapped_tensor (views of such tensors included).
bool is_file_mapped(const at::Tensor& t);

/// The path of the file `t`'s storage maps, or "" when it is not mapped.
std::string mapped_path(const at::Tensor& t);

/// Asks the kernel to read ahead the pages holding `t`'s elements, for a tensor about to be
/// used. Does nothing for tensors that are not mapped; never throws (it is advice only).
void advise_will_need(const at::Tensor& t) noexcept;

}  // namespace accelerate::detail
