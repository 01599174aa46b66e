#include "checksum.h"

#include <c10/util/Exception.h>

#include <fcntl.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <system_error>
#include <thread>

#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

namespace accelerate::detail {

namespace {

constexpr uint32_t kPolynomial = 0x82F63B78u;  // Castagnoli, bit-reversed

// tables[k][b]: the CRC of byte b followed by k zero bytes, which lets eight bytes be folded
// with eight independent lookups instead of eight dependent steps.
struct Tables {
  std::array<std::array<uint32_t, 256>, 8> t{};
  Tables() {
    for (uint32_t b = 0; b < 256; ++b) {
      uint32_t crc = b;
      for (int i = 0; i < 8; ++i) crc = (crc >> 1) ^ (kPolynomial & (0u - (crc & 1u)));
      t[0][b] = crc;
    }
    for (uint32_t b = 0; b < 256; ++b) {
      for (size_t k = 1; k < 8; ++k) t[k][b] = (t[k - 1][b] >> 8) ^ t[0][t[k - 1][b] & 0xFFu];
    }
  }
};

const Tables& tables() {
  static const Tables instance;
  return instance;
}

#if defined(__x86_64__)
// One crc32 instruction has a latency of 3 cycles and a throughput of 1 per cycle: three
// independent streams over adjacent blocks keep it busy, and are joined with the linear map
// "append kBlock zero bytes" (kShift), which the tables apply a byte at a time.
constexpr size_t kBlock = 8192;

__attribute__((target("sse4.2"))) uint64_t sse42_words(uint64_t c, const unsigned char* p,
                                                       size_t words) {
  for (size_t i = 0; i < words; ++i, p += 8) {
    uint64_t word;
    std::memcpy(&word, p, 8);
    c = _mm_crc32_u64(c, word);
  }
  return c;
}

struct ShiftTables {
  std::array<std::array<uint32_t, 256>, 4> t{};
  ShiftTables() {
    // The map is linear in the register: tabulate it on each bit, then on each byte value.
    uint32_t bit_image[32];
    for (int bit = 0; bit < 32; ++bit) {
      bit_image[bit] = static_cast<uint32_t>(sse42_zeros(uint64_t{1} << bit));
    }
    for (int k = 0; k < 4; ++k) {
      for (uint32_t b = 0; b < 256; ++b) {
        uint32_t image = 0;
        for (int bit = 0; bit < 8; ++bit) {
          if (b >> bit & 1u) image ^= bit_image[8 * k + bit];
        }
        t[k][b] = image;
      }
    }
  }
  __attribute__((target("sse4.2"))) static uint64_t sse42_zeros(uint64_t c) {
    for (size_t i = 0; i < kBlock / 8; ++i) c = _mm_crc32_u64(c, 0);
    return c;
  }
  uint32_t shift(uint32_t c) const {
    return t[0][c & 0xFF] ^ t[1][(c >> 8) & 0xFF] ^ t[2][(c >> 16) & 0xFF] ^ t[3][c >> 24];
  }
};

__attribute__((target("sse4.2"))) uint32_t crc32c_sse42(uint32_t crc, const unsigned char* p,
                                                        size_t size) {
  uint64_t c = ~crc;
  while (size > 0 && (reinterpret_cast<uintptr_t>(p) & 7u) != 0) {
    c = _mm_crc32_u8(static_cast<uint32_t>(c), *p++);
    --size;
  }
  if (size >= 3 * kBlock) {
    static const ShiftTables shifts;
    for (; size >= 3 * kBlock; size -= 3 * kBlock, p += 3 * kBlock) {
      uint64_t c0 = c;
      uint64_t c1 = 0;
      uint64_t c2 = 0;
      for (size_t i = 0; i < kBlock; i += 8) {
        uint64_t w0;
        uint64_t w1;
        uint64_t w2;
        std::memcpy(&w0, p + i, 8);
        std::memcpy(&w1, p + kBlock + i, 8);
        std::memcpy(&w2, p + 2 * kBlock + i, 8);
        c0 = _mm_crc32_u64(c0, w0);
        c1 = _mm_crc32_u64(c1, w1);
        c2 = _mm_crc32_u64(c2, w2);
      }
      c = shifts.shift(shifts.shift(static_cast<uint32_t>(c0)) ^ static_cast<uint32_t>(c1)) ^
          static_cast<uint32_t>(c2);
    }
  }
  c = sse42_words(c, p, size / 8);
  p += size / 8 * 8;
  for (size %= 8; size > 0; --size) c = _mm_crc32_u8(static_cast<uint32_t>(c), *p++);
  return ~static_cast<uint32_t>(c);
}

bool has_sse42() {
  static const bool yes = __builtin_cpu_supports("sse4.2");
  return yes;
}
#endif

}  // namespace

uint32_t crc32c_portable(uint32_t crc, const void* data, size_t size) {
  const auto& t = tables().t;
  const auto* p = static_cast<const unsigned char*>(data);
  uint32_t c = ~crc;
  for (; size >= 8; size -= 8, p += 8) {
    uint32_t lo;
    uint32_t hi;
    std::memcpy(&lo, p, 4);
    std::memcpy(&hi, p + 4, 4);
    lo ^= c;  // little-endian: the CRC folds into the first four bytes
    c = t[7][lo & 0xFF] ^ t[6][(lo >> 8) & 0xFF] ^ t[5][(lo >> 16) & 0xFF] ^ t[4][lo >> 24] ^
        t[3][hi & 0xFF] ^ t[2][(hi >> 8) & 0xFF] ^ t[1][(hi >> 16) & 0xFF] ^ t[0][hi >> 24];
  }
  for (; size > 0; --size) c = (c >> 8) ^ t[0][(c ^ *p++) & 0xFF];
  return ~c;
}

bool crc32c_is_hardware() {
#if defined(__x86_64__)
  return has_sse42();
#else
  return false;
#endif
}

uint32_t crc32c(uint32_t crc, const void* data, size_t size) {
#if defined(__x86_64__)
  if (has_sse42()) return crc32c_sse42(crc, static_cast<const unsigned char*>(data), size);
#endif
  return crc32c_portable(crc, data, size);
}

uint32_t crc32c_of_file(const std::string& path, uint64_t offset) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  TORCH_CHECK(fd >= 0, "accelerate: cannot open \"", path, "\": ", std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    TORCH_CHECK(false, "accelerate: cannot stat \"", path, "\": ", std::strerror(err));
  }
  const auto size = static_cast<uint64_t>(st.st_size);
  if (offset >= size) {
    ::close(fd);
    return 0;
  }
  // Mapped, so that bytes already in the page cache (a file just written, or about to be
  // loaded) are hashed where they lie instead of being copied first.
  // MAP_POPULATE: one fault per page would cost more than the hashing.
  void* base = ::mmap(nullptr, size, PROT_READ, MAP_SHARED | MAP_POPULATE, fd, 0);
  const int err = errno;
  ::close(fd);
  TORCH_CHECK(base != MAP_FAILED, "accelerate: cannot map \"", path, "\": ", std::strerror(err));
  const uint32_t crc = crc32c(0, static_cast<const char*>(base) + offset, size - offset);
  ::munmap(base, size);
  return crc;
}

namespace {

// A second thread only helps where this process may run on a second core.
bool can_overlap() {
  static const bool yes = [] {
    cpu_set_t cpus;
    CPU_ZERO(&cpus);
    if (::sched_getaffinity(0, sizeof(cpus), &cpus) == 0) return CPU_COUNT(&cpus) > 1;
    return std::thread::hardware_concurrency() != 1;
  }();
  return yes;
}

}  // namespace

// One piece at a time: handed over by start(), collected by wait().
struct OverlappedCrc32c::Worker {
  std::mutex mutex;
  std::condition_variable wake;      // a piece was handed over, or stop
  std::condition_variable finished;  // the piece is hashed
  const void* data = nullptr;
  size_t size = 0;
  uint32_t crc = 0;
  bool pending = false;
  bool stop = false;
  std::thread thread;

  Worker() {
    thread = std::thread([this] { run(); });
  }
  ~Worker() {
    {
      std::lock_guard<std::mutex> lock(mutex);
      stop = true;
    }
    wake.notify_one();
    thread.join();
  }

  void run() {
    std::unique_lock<std::mutex> lock(mutex);
    for (;;) {
      wake.wait(lock, [&] { return pending || stop; });
      if (!pending) return;
      const void* const piece = data;
      const size_t n = size;
      const uint32_t before = crc;
      lock.unlock();
      const uint32_t after = crc32c(before, piece, n);
      lock.lock();
      crc = after;
      pending = false;
      finished.notify_one();
    }
  }

  void start(uint32_t from, const void* piece, size_t n) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      crc = from;
      data = piece;
      size = n;
      pending = true;
    }
    wake.notify_one();
  }

  uint32_t wait() {
    std::unique_lock<std::mutex> lock(mutex);
    finished.wait(lock, [&] { return !pending; });
    return crc;
  }
};

OverlappedCrc32c::OverlappedCrc32c() = default;
OverlappedCrc32c::~OverlappedCrc32c() = default;

void OverlappedCrc32c::update_during(const void* data, size_t size,
                                     const std::function<void()>& work) {
  if (size >= kOverlapMinBytes && !worker_ && can_overlap()) {
    try {
      worker_ = std::make_unique<Worker>();
    } catch (const std::system_error&) {
      // No thread to be had: hash on this one.
    }
  }
  if (size < kOverlapMinBytes || !worker_) {
    work();
    crc_ = crc32c(crc_, data, size);
    return;
  }
  worker_->start(crc_, data, size);
  try {
    work();
  } catch (...) {
    (void)worker_->wait();  // the caller may free `data` as the exception unwinds
    throw;
  }
  crc_ = worker_->wait();
}

std::map<std::string, uint32_t>*& checksum_sink() {
  thread_local std::map<std::string, uint32_t>* sink = nullptr;
  return sink;
}

const char*& data_checksum_key() {
  thread_local const char* key = nullptr;
  return key;
}

std::string crc32c_hex(uint32_t crc) {
  char text[9];
  std::snprintf(text, sizeof(text), "%08x", crc);
  return text;
}

bool parse_crc32c_hex(const std::string& text, uint32_t* crc) {
  if (text.size() != 8) return false;
  uint32_t value = 0;
  for (char ch : text) {
    uint32_t digit;
    if (ch >= '0' && ch <= '9') {
      digit = static_cast<uint32_t>(ch - '0');
    } else if (ch >= 'a' && ch <= 'f') {
      digit = static_cast<uint32_t>(ch - 'a' + 10);
    } else {
      return false;
    }
    value = value << 4 | digit;
  }
  *crc = value;
  return true;
}

}  // namespace accelerate::detail
