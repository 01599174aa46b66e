// What the two library-free launch probes (launch_probe, restart_probe) share. Header-only and
// without LibTorch, so that the probes start in milliseconds.
#pragma once

#include <unistd.h>

#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>

namespace probe {

// One write() per call where the pipe allows, so that lines from several ranks interleave only
// between reports, never inside one.
inline void write_all(int fd, const std::string& text) {
  const char* p = text.data();
  std::size_t left = text.size();
  while (left > 0) {
    const ssize_t n = ::write(fd, p, left);
    if (n <= 0) return;
    p += n;
    left -= static_cast<std::size_t>(n);
  }
}

inline std::string env_or(const char* name, const char* fallback) {
  const char* v = std::getenv(name);
  return v != nullptr ? v : fallback;
}

// Written under a temporary name and renamed, so a test never reads a half-written pid.
inline void write_pid_file(const std::string& path) {
  {
    std::ofstream out(path + ".tmp");
    out << ::getpid() << "\n";
  }
  std::rename((path + ".tmp").c_str(), path.c_str());
}

}  // namespace probe
