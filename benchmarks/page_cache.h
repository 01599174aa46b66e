#pragma once
// What the I/O benchmarks share: errors from system calls, and control of the page cache for
// "cold" and "warm" runs (posix_fadvise needs no root; mincore shows what is resident).

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace bench {

[[noreturn]] inline void die(const std::string& what) {
  throw std::runtime_error(what + ": " + std::strerror(errno));
}

// Writes back anything dirty first: only clean pages can be dropped.
inline void evict(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) die("open " + path);
  if (::fsync(fd) != 0) die("fsync " + path);
  if (::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) != 0) die("posix_fadvise " + path);
  ::close(fd);
}

// Fraction of the file's pages in the page cache.
inline double residency(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) die("open " + path);
  struct stat info {};
  ::fstat(fd, &info);
  const auto size = static_cast<size_t>(info.st_size);
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
  ::close(fd);
  if (map == MAP_FAILED) die("mmap " + path);
  const auto page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  std::vector<unsigned char> vec((size + page - 1) / page);
  if (::mincore(map, size, vec.data()) != 0) die("mincore " + path);
  ::munmap(map, size);
  const auto resident =
      std::count_if(vec.begin(), vec.end(), [](unsigned char c) { return c & 1; });
  return static_cast<double>(resident) / static_cast<double>(vec.size());
}

}  // namespace bench
