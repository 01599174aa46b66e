#include "file_mapping.h"

#include <c10/core/Storage.h>
#include <c10/util/Exception.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>

namespace accelerate::detail {
namespace {

// What a mapped tensor's DataPtr owns. The deleter's address doubles as the mark that
// is_file_mapped looks for, so it must be this one function and no lambda.
struct MappedContext {
  std::shared_ptr<FileMapping> mapping;
};

void delete_mapped_context(void* context) {
  delete static_cast<MappedContext*>(context);
}

const MappedContext* context_of(const at::Tensor& t) {
  if (!t.defined() || !t.has_storage()) return nullptr;
  return t.storage().data_ptr().cast_context<MappedContext>(&delete_mapped_context);
}

}  // namespace

std::string in_quotes(const std::string& s) {
  return "'" + s + "'";
}

std::string errno_text() {
  return std::strerror(errno);
}

FileDescriptor::~FileDescriptor() {
  if (fd_ >= 0) ::close(fd_);
}

FileDescriptor open_read_only(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  TORCH_CHECK(fd >= 0, "cannot open ", in_quotes(path), ": ", errno_text());
  return FileDescriptor(fd);
}

uint64_t regular_file_size(int fd, const std::string& path) {
  struct stat info {};
  TORCH_CHECK(::fstat(fd, &info) == 0, "cannot stat ", in_quotes(path), ": ", errno_text());
  // Reading or mapping a FIFO or a device could block or mean something else entirely.
  TORCH_CHECK(S_ISREG(info.st_mode), in_quotes(path), " is not a regular file");
  return static_cast<uint64_t>(info.st_size);
}

void read_exact(int fd, char* data, uint64_t size, uint64_t offset, const std::string& path) {
  while (size > 0) {
    const ssize_t got = ::pread(fd, data, static_cast<size_t>(size), static_cast<off_t>(offset));
    if (got < 0 && errno == EINTR) continue;
    TORCH_CHECK(got > 0, "cannot read ", in_quotes(path), ": ",
                got == 0 ? std::string("unexpected end of file") : errno_text());
    data += got;
    size -= static_cast<uint64_t>(got);
    offset += static_cast<uint64_t>(got);
  }
}

FileMapping::FileMapping(void* address, size_t size, std::string path)
    : address_(address), size_(size), path_(std::move(path)) {}

FileMapping::~FileMapping() {
  if (address_ != nullptr) ::munmap(address_, size_);
}

std::shared_ptr<FileMapping> map_file(const std::string& path) {
  // The mapping keeps the file's pages reachable on its own, so the descriptor is not kept.
  const FileDescriptor fd = open_read_only(path);
  const auto size = static_cast<size_t>(regular_file_size(fd.get(), path));
  if (size == 0) return std::make_shared<FileMapping>(nullptr, 0, path);
  // PROT_WRITE with MAP_PRIVATE: in-place updates of loaded tensors (optimizer steps) must work,
  // and they land in private copied pages, never in the file.
  void* address = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd.get(), 0);
  TORCH_CHECK(address != MAP_FAILED, "cannot map ", in_quotes(path), ": ", errno_text());
  try {
    return std::make_shared<FileMapping>(address, size, path);
  } catch (...) {
    ::munmap(address, size);
    throw;
  }
}

at::Tensor mapped_tensor(const std::shared_ptr<FileMapping>& mapping, uint64_t offset,
                         at::IntArrayRef shape, at::ScalarType dtype) {
  TORCH_CHECK(mapping != nullptr, "mapped_tensor needs a mapping");
  const std::string& path = mapping->path();
  const uint64_t item_size = c10::elementSize(dtype);
  uint64_t nbytes = item_size;
  for (const int64_t dim : shape) {
    TORCH_CHECK(dim >= 0, "cannot view ", in_quotes(path), " as shape ", shape,
                ": negative dimension");
    TORCH_CHECK(!__builtin_mul_overflow(nbytes, static_cast<uint64_t>(dim), &nbytes),
                "cannot view ", in_quotes(path), " as shape ", shape, ": too many bytes");
  }
  uint64_t end = 0;
  TORCH_CHECK(!__builtin_add_overflow(offset, nbytes, &end) && end <= mapping->size(), "the ",
              nbytes, " bytes of a ", dtype, " tensor of shape ", shape, " at offset ", offset,
              " are outside the ", mapping->size(), "-byte file ", in_quotes(path));
  char* data = mapping->data() == nullptr ? nullptr : mapping->data() + offset;
  // LibTorch's kernels may load elements with aligned instructions.
  TORCH_CHECK(reinterpret_cast<uintptr_t>(data) % item_size == 0, "offset ", offset, " in ",
              in_quotes(path), " is not aligned for ", dtype, " (", item_size, " bytes)");

  auto context = std::make_unique<MappedContext>(MappedContext{mapping});
  c10::DataPtr data_ptr(data, context.get(), &delete_mapped_context, c10::Device(c10::kCPU));
  context.release();
  // Not resizable and no allocator: resizing would have to copy out of the file, which a caller
  // should do explicitly.
  c10::Storage storage(c10::Storage::use_byte_size_t(), static_cast<size_t>(nbytes),
                       std::move(data_ptr), nullptr, false);
  at::Tensor tensor = at::detail::make_tensor<c10::TensorImpl>(
      std::move(storage), c10::DispatchKeySet(c10::DispatchKey::CPU),
      c10::scalarTypeToTypeMeta(dtype));
  tensor.unsafeGetTensorImpl()->set_sizes_contiguous(shape);
  return tensor;
}

bool is_file_mapped(const at::Tensor& t) {
  return context_of(t) != nullptr;
}

std::string mapped_path(const at::Tensor& t) {
  const MappedContext* context = context_of(t);
  return context == nullptr ? std::string() : context->mapping->path();
}

void advise_will_need(const at::Tensor& t) noexcept {
  try {
    const MappedContext* context = context_of(t);
    if (context == nullptr || t.numel() == 0 || context->mapping->size() == 0) return;
    // The elements of a view span from its first element to its last along every stride.
    uint64_t span = 1;
    for (int64_t d = 0; d < t.dim(); ++d) {
      span += static_cast<uint64_t>(t.size(d) - 1) * static_cast<uint64_t>(t.stride(d));
    }
    const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
    const auto map_begin = reinterpret_cast<uintptr_t>(context->mapping->data());
    const uintptr_t map_end = map_begin + context->mapping->size();
    const uintptr_t end = std::min<uintptr_t>(begin + span * t.element_size(), map_end);
    if (begin < map_begin || begin >= end) return;
    // madvise takes a page-aligned start; the mapping itself starts on a page.
    const auto page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
    const uintptr_t aligned = begin - (begin - map_begin) % page;
    (void)::madvise(reinterpret_cast<void*>(aligned), end - aligned, MADV_WILLNEED);
  } catch (...) {
    // Advice: failing to give it changes nothing but speed.
  }
}

}  // namespace accelerate::detail
