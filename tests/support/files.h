#pragma once
// What the tests use to make, read and inspect files.

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <system_error>
#include <vector>

namespace accelerate::testing {

/// A fresh, empty directory under the system's temporary directory, removed with everything in
/// it when this object dies.
class TempDir {
 public:
  TempDir() {
    // mkdtemp makes every directory unique (two in one test, concurrent test programs) without
    // removing anything that exists; the test's name tells what left one behind after a crash.
    std::string templ = (std::filesystem::temp_directory_path() / (prefix() + "_XXXXXX")).string();
    if (::mkdtemp(templ.data()) == nullptr) {
      throw std::runtime_error(std::string("mkdtemp: ") + std::strerror(errno));
    }
    path_ = templ;
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }

  const std::filesystem::path& path() const { return path_; }
  /// The path of `name` (which may hold '/') inside the directory.
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  /// The names directly inside the directory, sorted.
  std::vector<std::string> entries() const {
    std::vector<std::string> names;
    for (const auto& entry : std::filesystem::directory_iterator(path_)) {
      names.push_back(entry.path().filename().string());
    }
    std::sort(names.begin(), names.end());
    return names;
  }

 private:
  static std::string prefix() {
    const ::testing::TestInfo* test = ::testing::UnitTest::GetInstance()->current_test_info();
    if (test == nullptr) return "accelerate_test";
    std::string name = std::string(test->test_suite_name()) + "." + test->name();
    // Parameterized tests' names hold '/', and a file name has at most 255 bytes.
    std::replace(name.begin(), name.end(), '/', '_');
    return "accelerate_" + name.substr(0, 100);
  }

  std::filesystem::path path_;
};

/// `s` between single quotes, the form errors show paths and names in. Not named `quoted`: for a
/// non-const std::string argument, ADL would prefer std::quoted.
inline std::string in_quotes(const std::string& s) {
  return "'" + s + "'";
}

/// Replaces the file at `path` with `bytes`.
inline void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

/// The bytes of the file at `path`, or "" when it cannot be read.
inline std::string file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream bytes;
  bytes << in.rdbuf();
  return bytes.str();
}

/// The value of the `key` line ("VmRSS", "RssAnon", ...) of /proc/self/status in bytes, or -1
/// when there is no such line.
inline int64_t proc_status_bytes(const std::string& key) {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(key + ":", 0) == 0) {
      std::istringstream fields(line.substr(key.size() + 1));
      int64_t kb = 0;
      fields >> kb;
      return kb * 1024;
    }
  }
  return -1;
}

}  // namespace accelerate::testing
