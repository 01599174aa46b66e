// Checkpoint I/O of a ~1 GiB float32 state dict, each path against baselines measured in the same
// run. The state dict is shaped like a GPT-2-style transformer (hidden size 1024: an embedding of
// 1/8 of the total, then blocks of four large matrices and eight small vectors), so that both
// the per-tensor costs and the bulk bandwidth show.
//
//   save: safetensors::save_file (atomic: temp file, fsync, rename, fsync of the directory)
//         against write() of the same bytes + fsync, write() without fsync, torch::save of the
//         module (which does not fsync) and torch::save followed by an fsync. Twice per
//         repetition: into a fresh file (each variant's previous output removed, untimed, first)
//         and replacing the previous file, as repeated checkpoints to one path do. Both, because
//         save_file must keep the old file until its rename while O_TRUNC frees the old pages
//         before writing, and on a VM that hands freed memory back to its host (virtio free page
//         reporting) writing into newly allocated page-cache pages costs a host fault per page.
//   load: load_checkpoint_in_model and safetensors::load_file + copy_ into the module's
//         parameters, against pread() of each tensor's bytes straight into those parameters and
//         torch::load of the module. Every variant ends with every byte in the module, read by the
//         CPU, as a real model load does.
//   checksums: CRC32C of the state dict in memory (the hardware and the table-driven
//         implementation); Accelerator::save_state of the model with its checksums and without
//         (ACCELERATE_CHECKPOINT_CHECKSUMS=0); save_model, whose header holds the CRC32C of the
//         data, against save_file of the same tensors. Pairs run back to back, in an order
//         swapped every repetition, after a warm-up pair.
//
// Loads run twice per repetition: "cold" after evicting the file from the page cache with
// posix_fadvise(POSIX_FADV_DONTNEED) (no root needed; residency is checked with mincore), then
// "warm". Cold means the guest's page cache only: the hypervisor may still cache the disk.
//
// ratio = baseline time / our time, so > 1 means ours is faster. Variants are interleaved within
// each repetition, in an order rotated from one repetition to the next, so that machine noise hits
// them alike; medians are reported.
//
// Run it directly: build/benchmarks/bench_checkpoint [--mib 1024] [--reps 5] [--dir /tmp]
//                   [--part all|io|checksums]   (default all: the save and load tables, then the
//                                                checksums)

#include "../src/detail/checksum.h"
#include "page_cache.h"

#include <accelerate/accelerator.h>
#include <accelerate/checkpoint_state.h>
#include <accelerate/checkpointing.h>
#include <accelerate/safetensors.h>

#include <ATen/Parallel.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <torch/serialize.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

using bench::die;
using bench::evict;
using bench::residency;

using Clock = std::chrono::steady_clock;
namespace st = accelerate::safetensors;
using Items = std::vector<std::pair<std::string, at::Tensor>>;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

// ------------------------------------------------------------------------------ the state dict

// A block's tensors, named as in GPT-2's state dict, with shapes for hidden size d.
std::vector<std::pair<std::string, std::vector<int64_t>>> block_shapes(int64_t d) {
  return {{"ln_1_weight", {d}},
          {"ln_1_bias", {d}},
          {"attn_c_attn_weight", {d, 3 * d}},
          {"attn_c_attn_bias", {3 * d}},
          {"attn_c_proj_weight", {d, d}},
          {"attn_c_proj_bias", {d}},
          {"ln_2_weight", {d}},
          {"ln_2_bias", {d}},
          {"mlp_c_fc_weight", {d, 4 * d}},
          {"mlp_c_fc_bias", {4 * d}},
          {"mlp_c_proj_weight", {4 * d, d}},
          {"mlp_c_proj_bias", {d}}};
}

// Nested submodules rather than flat names because LibTorch refuses dots in parameter names, and
// torch::save/load need a real module tree to be the fair baseline.
std::shared_ptr<torch::nn::Module> make_model(int64_t mib) {
  constexpr int64_t d = 1024;
  const int64_t total_floats = mib * 1024 * 1024 / 4;
  const int64_t vocab = std::max<int64_t>(1, total_floats / 8 / d);
  const int64_t block_floats = 12 * d * d + 13 * d;
  const int64_t blocks = std::max<int64_t>(1, (total_floats - vocab * d) / block_floats);

  torch::NoGradGuard no_grad;
  auto init = [](std::vector<int64_t> shape) { return at::empty(shape).uniform_(-1, 1); };
  auto root = std::make_shared<torch::nn::Module>("GPT");
  auto wte = std::make_shared<torch::nn::Module>("Embedding");
  wte->register_parameter("weight", init({vocab, d}));
  root->register_module("wte", wte);
  auto h = std::make_shared<torch::nn::Module>("Blocks");
  for (int64_t i = 0; i < blocks; ++i) {
    auto block = std::make_shared<torch::nn::Module>("Block");
    for (const auto& [name, shape] : block_shapes(d)) block->register_parameter(name, init(shape));
    h->register_module(std::to_string(i), block);
  }
  root->register_module("h", h);
  auto ln_f = std::make_shared<torch::nn::Module>("LayerNorm");
  ln_f->register_parameter("weight", init({d}));
  ln_f->register_parameter("bias", init({d}));
  root->register_module("ln_f", ln_f);
  return root;
}

// ------------------------------------------------------------------------------ raw file helpers

void write_all(int fd, const char* data, size_t size) {
  while (size > 0) {
    const ssize_t n = ::write(fd, data, size);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) die("write");
    data += n;
    size -= static_cast<size_t>(n);
  }
}

void pread_all(int fd, char* data, size_t size, off_t offset) {
  while (size > 0) {
    const ssize_t n = ::pread(fd, data, size, offset);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) die("pread");
    data += n;
    size -= static_cast<size_t>(n);
    offset += n;
  }
}

void fsync_path(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) die("open " + path);
  if (::fsync(fd) != 0) die("fsync " + path);
  ::close(fd);
}

std::string read_prefix(const std::string& path, size_t n) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) die("open " + path);
  std::string bytes(n, '\0');
  pread_all(fd, bytes.data(), n, 0);
  ::close(fd);
  return bytes;
}

bool same_contents(const std::string& a, const std::string& b) {
  const int fa = ::open(a.c_str(), O_RDONLY | O_CLOEXEC);
  const int fb = ::open(b.c_str(), O_RDONLY | O_CLOEXEC);
  if (fa < 0 || fb < 0) die("open");
  std::vector<char> x(1 << 24), y(1 << 24);
  bool same = true;
  while (same) {
    const ssize_t na = ::read(fa, x.data(), x.size());
    const ssize_t nb = ::read(fb, y.data(), y.size());
    same = na == nb && na >= 0 && std::memcmp(x.data(), y.data(), static_cast<size_t>(na)) == 0;
    if (na <= 0) break;
  }
  ::close(fa);
  ::close(fb);
  return same;
}

// ------------------------------------------------------------------------------ the variants

struct Variant {
  std::string name;
  std::string file;  // what it writes or reads
  std::function<void()> run;
  // Saves: [0] into a fresh file, [1] replacing the previous one. Loads: [0] cold, [1] warm.
  std::vector<double> times[2];
};

void timed_save(Variant& v, bool replace) {
  if (!replace) ::unlink(v.file.c_str());
  const auto start = Clock::now();
  v.run();
  v.times[replace].push_back(seconds_since(start));
  // A save that left dirty pages behind would otherwise bill their writeback to the next variant.
  fsync_path(v.file);
}

struct Row {
  std::string name;
  double seconds;
};

void print_table(const char* title, const std::vector<Row>& rows, const std::string& ours,
                 double bytes) {
  double ours_s = 0;
  for (const auto& r : rows)
    if (r.name == ours) ours_s = r.seconds;
  std::printf("%s\n  %-40s %10s %8s %18s\n", title, "variant", "median", "GB/s", "ratio vs ours");
  for (const auto& r : rows) {
    std::printf("  %-40s %8.1f ms %8.2f %18.2f\n", r.name.c_str(), r.seconds * 1e3,
                bytes / r.seconds / 1e9, r.seconds / ours_s);
  }
  std::printf("\n");
}

// Two ways of saving, timed A B B A in every repetition after one such warm-up round. Saves in a
// row here alternate between faster and slower ones (by up to 2x on this VM, the cause not
// established), so A B, B A, A B, ... would bill that to whichever variant runs second in most
// repetitions; A B B A gives each variant one of each in every repetition.
struct Paired {
  std::vector<double> a, b;    // mean of each repetition's two saves
  std::vector<double> ratios;  // b / a in each repetition
};

Paired run_paired(int reps, const std::function<void()>& a, const std::function<void()>& b) {
  Paired out;
  for (int rep = 0; rep <= reps; ++rep) {
    double ta = 0;
    double tb = 0;
    for (int k = 0; k < 4; ++k) {
      const bool is_a = k == 0 || k == 3;
      const auto start = Clock::now();
      (is_a ? a : b)();
      (is_a ? ta : tb) += seconds_since(start);
    }
    if (rep == 0) continue;  // warm-up
    out.a.push_back(ta / 2);
    out.b.push_back(tb / 2);
    out.ratios.push_back(tb / ta);
  }
  return out;
}

void print_paired(const char* a_name, const char* b_name, const Paired& p) {
  std::printf("  %-40s %8.1f ms\n", a_name, median(p.a) * 1e3);
  std::printf(
      "  %-40s %8.1f ms   %+.1f%% (median of the repetitions' ratios; of the medians %+.1f%%)\n",
      b_name, median(p.b) * 1e3, (median(p.ratios) - 1) * 100,
      (median(p.b) / median(p.a) - 1) * 100);
  std::printf("  %-40s", "  ratio in each repetition");
  for (double r : p.ratios) std::printf(" %.3f", r);
  std::printf("\n");
}

// The three load averages of /proc/loadavg: the machine is shared, and the numbers depend on it.
std::string load_average() {
  std::FILE* f = std::fopen("/proc/loadavg", "r");
  if (f == nullptr) return "(unknown)";
  double a = 0, b = 0, c = 0;
  const int n = std::fscanf(f, "%lf %lf %lf", &a, &b, &c);
  std::fclose(f);
  if (n != 3) return "(unknown)";
  char text[64];
  std::snprintf(text, sizeof(text), "%.2f %.2f %.2f", a, b, c);
  return text;
}

std::string env(const char* name) {
  const char* value = std::getenv(name);
  return value ? value : "(unset)";
}

}  // namespace

int main(int argc, char** argv) {
  int64_t mib = 1024;
  int reps = 5;
  std::string base = "/tmp";
  std::string part = "all";
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--mib") == 0) mib = std::max<int64_t>(16, std::atoll(argv[i + 1]));
    if (std::strcmp(argv[i], "--reps") == 0) reps = std::max(1, std::atoi(argv[i + 1]));
    if (std::strcmp(argv[i], "--dir") == 0) base = argv[i + 1];
    if (std::strcmp(argv[i], "--part") == 0) part = argv[i + 1];
  }
  if (part != "all" && part != "io" && part != "checksums") {
    std::fprintf(stderr, "--part must be all, io or checksums, got %s\n", part.c_str());
    return 2;
  }
  const bool run_io = part != "checksums";
  const bool run_checksums = part != "io";
  std::string templ = base + "/bench_checkpoint.XXXXXX";
  if (::mkdtemp(templ.data()) == nullptr) die("mkdtemp " + templ);
  const std::string dir = templ;
  const auto total_start = Clock::now();

  auto model = make_model(mib);
  const Items items = accelerate::model_state(*model);
  std::vector<at::Tensor> reference;
  int64_t bytes = 0;
  size_t large = 0;
  for (const auto& [name, t] : items) {
    reference.push_back(t.detach().clone());
    bytes += static_cast<int64_t>(t.nbytes());
    large += t.nbytes() >= (size_t{1} << 20) ? 1 : 0;
  }
  std::printf(
      "checkpoint I/O benchmark; OMP_NUM_THREADS=%s, at::get_num_threads()=%d, hardware "
      "threads=%u\n"
      "state dict: %zu float32 tensors (%zu of >= 1 MiB, the rest small vectors), %.1f MiB; "
      "%d repetitions; files in %s\n\n",
      env("OMP_NUM_THREADS").c_str(), at::get_num_threads(), std::thread::hardware_concurrency(),
      items.size(), large, static_cast<double>(bytes) / (1 << 20), reps, dir.c_str());

  if (run_io) {
    const std::string st_path = dir + "/model.safetensors";
    const std::string raw_path = dir + "/raw.bin";
    const std::string raw_nosync_path = dir + "/raw_nosync.bin";
    const std::string pt_path = dir + "/model.pt";
    const std::string pt_fsync_path = dir + "/model_fsync.pt";

    // The raw baselines write the very bytes save_file writes: its header, then the tensors in its
    // data order (all float32 here, so the caller's order).
    st::save_file(items, st_path);
    const st::Header header = st::read_header(st_path);
    const std::string header_bytes = read_prefix(st_path, header.data_start);
    auto raw_write = [&](const std::string& path, bool sync) {
      const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
      if (fd < 0) die("open " + path);
      write_all(fd, header_bytes.data(), header_bytes.size());
      for (const auto& item : items) {
        write_all(fd, static_cast<const char*>(item.second.data_ptr()), item.second.nbytes());
      }
      if (sync && ::fsync(fd) != 0) die("fsync " + path);
      if (::close(fd) != 0) die("close " + path);
    };

    std::vector<Variant> saves;
    saves.push_back(
        {"safetensors::save_file (ours)", st_path, [&] { st::save_file(items, st_path); }});
    saves.push_back({"raw write() + fsync", raw_path, [&] { raw_write(raw_path, true); }});
    saves.push_back(
        {"raw write(), no fsync", raw_nosync_path, [&] { raw_write(raw_nosync_path, false); }});
    saves.push_back(
        {"torch::save(module), no fsync", pt_path, [&] { torch::save(model, pt_path); }});
    saves.push_back({"torch::save(module) + fsync", pt_fsync_path, [&] {
                       torch::save(model, pt_fsync_path);
                       fsync_path(pt_fsync_path);
                     }});

    // The load baselines know the layout in advance: no parsing, one pread per tensor straight into
    // the parameter it belongs to.
    std::map<std::string, at::Tensor> params;
    for (const auto& item : model->named_parameters()) params.emplace(item.key(), item.value());
    std::vector<std::pair<at::Tensor, off_t>> raw_plan;
    for (const auto& info : header.tensors) {
      raw_plan.emplace_back(params.at(info.name),
                            static_cast<off_t>(header.data_start + info.begin));
    }
    auto raw_read = [&] {
      const int fd = ::open(st_path.c_str(), O_RDONLY | O_CLOEXEC);
      if (fd < 0) die("open " + st_path);
      for (const auto& [target, offset] : raw_plan) {
        pread_all(fd, static_cast<char*>(target.data_ptr()), target.nbytes(), offset);
      }
      ::close(fd);
    };
    auto load_file_copy = [&] {
      torch::NoGradGuard no_grad;
      const auto file = st::load_file(st_path);
      for (const auto& [name, t] : file.tensors) params.at(name).copy_(t);
    };

    std::vector<Variant> loads;
    loads.push_back({"load_checkpoint_in_model (ours)", st_path,
                     [&] { accelerate::load_checkpoint_in_model(*model, st_path); }});
    loads.push_back({"safetensors::load_file + copy_ (ours)", st_path, load_file_copy});
    loads.push_back({"raw pread() into the parameters", st_path, raw_read});
    loads.push_back({"torch::load(module)", pt_path, [&] { torch::load(model, pt_path); }});

    // Untimed check that the files match and that every load restores the module: a benchmark of
    // a path that loads the wrong bytes would be meaningless.
    for (auto& v : saves) v.run();
    for (const auto& v : saves) fsync_path(v.file);
    if (!same_contents(st_path, raw_path) || !same_contents(st_path, raw_nosync_path)) {
      std::fprintf(stderr, "raw files differ from the safetensors file\n");
      return 1;
    }
    for (auto& v : loads) {
      {
        torch::NoGradGuard no_grad;
        for (auto& [name, p] : params) p.zero_();
      }
      v.run();
      for (size_t i = 0; i < items.size(); ++i) {
        if (!at::equal(params.at(items[i].first), reference[i])) {
          std::fprintf(stderr, "%s did not restore %s\n", v.name.c_str(), items[i].first.c_str());
          return 1;
        }
      }
    }
    reference.clear();
    evict(st_path);
    const double after_evict = residency(st_path);
    const bool cold = after_evict < 0.01;
    std::printf(
        "page cache: %.1f%% of the safetensors file resident after POSIX_FADV_DONTNEED%s\n\n",
        after_evict * 100, cold ? "" : " (eviction failed: cold numbers are warm)");

    for (int rep = 0; rep < reps; ++rep) {
      for (const bool replace : {false, true}) {
        for (size_t k = 0; k < saves.size(); ++k) {
          timed_save(saves[(k + static_cast<size_t>(rep)) % saves.size()], replace);
        }
      }
      for (size_t k = 0; k < loads.size(); ++k) {
        Variant& v = loads[(k + static_cast<size_t>(rep)) % loads.size()];
        evict(v.file);
        auto start = Clock::now();
        v.run();
        v.times[0].push_back(seconds_since(start));
        start = Clock::now();
        v.run();
        v.times[1].push_back(seconds_since(start));
      }
    }

    const auto b = static_cast<double>(bytes);
    std::vector<Row> rows;
    for (const auto& v : saves) rows.push_back({v.name, median(v.times[0])});
    print_table("save into a fresh file (ratio = variant / save_file, > 1: save_file is faster)",
                rows, saves[0].name, b);
    rows.clear();
    for (const auto& v : saves) rows.push_back({v.name, median(v.times[1])});
    print_table("save replacing the previous file (ratio = variant / save_file)", rows,
                saves[0].name, b);
    rows.clear();
    for (const auto& v : loads) rows.push_back({v.name, median(v.times[0])});
    print_table("load, cold page cache (ratio = variant / load_checkpoint_in_model)", rows,
                loads[0].name, b);
    rows.clear();
    for (const auto& v : loads) rows.push_back({v.name, median(v.times[1])});
    print_table("load, warm page cache (ratio = variant / load_checkpoint_in_model)", rows,
                loads[0].name, b);

    for (const auto& v : saves) ::unlink(v.file.c_str());
  }

  // What the checksums in checkpoints cost: hashing speed on the state dict's bytes, and
  // Accelerator::save_state of the model with and without them (interleaved, the order swapped
  // every repetition, replacing the previous checkpoint as repeated saves to one directory do).
  // The cost is reported twice: the ratio of the medians, and the median of each repetition's
  // own ratio (the two saves of one repetition ran under the same load).
  if (run_checksums) {
    namespace ck = accelerate::detail;
    std::vector<double> hw, portable;
    for (int rep = 0; rep < reps; ++rep) {
      auto start = Clock::now();
      uint32_t crc = 0;
      for (const auto& [name, t] : items) crc = ck::crc32c(crc, t.data_ptr(), t.nbytes());
      hw.push_back(seconds_since(start));
      start = Clock::now();
      uint32_t crc2 = 0;
      for (const auto& [name, t] : items)
        crc2 = ck::crc32c_portable(crc2, t.data_ptr(), t.nbytes());
      portable.push_back(seconds_since(start));
      if (crc != crc2) die("the CRC32C implementations disagree");
    }
    accelerate::Accelerator accelerator;
    accelerator.prepare_model(model);
    const std::string ckpt = dir + "/ckpt";
    const std::string load_before = load_average();
    auto without_sums = [&] {
      ::setenv(accelerate::kCheckpointChecksumsEnv, "0", 1);
      accelerator.save_state(ckpt);
    };
    auto with_sums = [&] {
      ::unsetenv(accelerate::kCheckpointChecksumsEnv);
      accelerator.save_state(ckpt);
    };
    const Paired state = run_paired(reps, without_sums, with_sums);
    with_sums();  // the last save, untimed, leaves checksums to verify below
    ::unsetenv(accelerate::kCheckpointChecksumsEnv);
    // save_model puts the CRC32C of the data in the file's header, so it hashes before writing;
    // its baseline is save_file of the same tensors, which records no checksum.
    const std::string model_dir = dir + "/saved_model";
    const std::string plain_file = dir + "/plain.safetensors";
    const Paired saved_model = run_paired(
        reps,
        [&] {
          st::save_file(items, plain_file, {{"format", "pt"}});
        },
        [&] { (void)accelerate::save_model(*model, model_dir); });
    const std::string load_after = load_average();
    // The checksums recorded must be those of the files: a fast save of wrong sums is no save.
    (void)accelerate::read_checkpoint_info(ckpt, /*verify=*/true);
    const std::string model_file = model_dir + "/model.safetensors";
    const st::Header model_header = st::read_header(model_file);
    if (model_header.metadata.at(accelerate::kDataChecksumKey) !=
        ck::crc32c_hex(ck::crc32c_of_file(model_file, model_header.data_start))) {
      die("save_model recorded a wrong checksum");
    }
    std::vector<double> verify;
    for (int rep = 0; rep < reps; ++rep) {
      const auto start = Clock::now();
      (void)accelerate::read_checkpoint_info(ckpt, /*verify=*/true);
      verify.push_back(seconds_since(start));
    }
    const auto b2 = static_cast<double>(bytes);
    std::printf("checksums (CRC32C, %s); load average before %s, after %s\n",
                ck::crc32c_is_hardware() ? "SSE4.2" : "no SSE4.2", load_before.c_str(),
                load_after.c_str());
    std::printf("  %-40s %8.1f ms %8.2f GB/s\n", "crc32c (used), in memory", median(hw) * 1e3,
                b2 / median(hw) / 1e9);
    std::printf("  %-40s %8.1f ms %8.2f GB/s\n", "crc32c slicing-by-8, in memory",
                median(portable) * 1e3, b2 / median(portable) / 1e9);
    print_paired("save_state without checksums", "save_state with checksums", state);
    std::printf("  %-40s %8.1f ms\n", "verifying the checkpoint (page cache)",
                median(verify) * 1e3);
    print_paired("save_file of the state dict", "save_model (data CRC32C in the header)",
                 saved_model);
    std::printf("\n");
    std::error_code ec;
    std::filesystem::remove_all(ckpt, ec);
    std::filesystem::remove_all(model_dir, ec);
    std::filesystem::remove(plain_file, ec);
  }

  ::rmdir(dir.c_str());
  std::printf("total time %.0f s\n", seconds_since(total_start));
  return 0;
}
