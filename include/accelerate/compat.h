#pragma once
/// \file
/// The one place where accelerate-cpp deals with differences between LibTorch versions.
///
/// Debian ships LibTorch 1.13 (CPU); users run 2.x with CUDA/NCCL. Everything that is spelled
/// differently between the two lives here, so the rest of the library is written once.
///
/// Example:
/// \code
///   c10::intrusive_ptr<accelerate::compat::Backend> pg = accelerate::compat::make_gloo(store,
///       rank, world_size, std::chrono::seconds(30));
/// \endcode

#include <ATen/autocast_mode.h>
#include <torch/version.h>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <c10/core/Allocator.h>

#include <chrono>
#include <cstring>
#include <string>
#include <type_traits>

#if defined(USE_C10D_NCCL)
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

namespace accelerate::compat {

#if TORCH_VERSION_MAJOR >= 2
/// The base class that concrete process groups (Gloo, NCCL) derive from.
using Backend = c10d::Backend;
#else
using Backend = c10d::ProcessGroup;
#endif

/// A pending collective.
using Work = c10d::Work;

/// True when this LibTorch was built with NCCL support.
inline constexpr bool kHasNccl =
#if defined(USE_C10D_NCCL)
    true;
#else
    false;
#endif

/// "major.minor.patch" of the LibTorch we were compiled against.
inline std::string torch_version() {
  return std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
         std::to_string(TORCH_VERSION_PATCH);
}

/// Where Gloo listens: a network interface name (`GLOO_SOCKET_IFNAME`), else the address a
/// hostname resolves to, else the machine's default interface.
struct GlooAddress {
  std::string interface;
  std::string hostname;
};

/// A Gloo process group whose collectives give up after `timeout`.
inline c10::intrusive_ptr<Backend> make_gloo(const c10::intrusive_ptr<c10d::Store>& store, int rank,
                                             int world_size, std::chrono::milliseconds timeout,
                                             const GlooAddress& address = {}) {
  auto options = c10d::ProcessGroupGloo::Options::create(timeout);
  if (!address.interface.empty()) {
    options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(address.interface));
  } else if (!address.hostname.empty()) {
    options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(address.hostname));
  } else {
    options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
  }
  return c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world_size, options);
}

/// An NCCL process group; only callable when kHasNccl.
inline c10::intrusive_ptr<Backend> make_nccl(const c10::intrusive_ptr<c10d::Store>& store, int rank,
                                             int world_size, std::chrono::milliseconds timeout) {
#if defined(USE_C10D_NCCL)
  auto options = c10d::ProcessGroupNCCL::Options::create();
  options->timeout = timeout;
  return c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world_size, options);
#else
  (void)store, (void)rank, (void)world_size, (void)timeout;
  TORCH_CHECK(false, "accelerate-cpp: this LibTorch was built without NCCL; use the gloo backend");
#endif
}

/// Connects a Gloo rendezvous context to every peer through `store` (a shared_ptr to a
/// gloo::rendezvous::Store): Gloo took the store by reference until 2025 and by shared_ptr since.
template <class Context, class StorePtr, class DevicePtr>
void connect_full_mesh(Context& context, const StorePtr& store, DevicePtr& device) {
  if constexpr (requires { context.connectFullMesh(store, device); }) {
    context.connectFullMesh(store, device);
  } else {
    context.connectFullMesh(*store, device);
  }
}

// ================================================================ allocators (cpu_allocator.h)
// LibTorch 2.3 made Allocator::allocate non-const and added a pure virtual copy_data. An allocator
// derives from CpuAllocatorBase and implements allocate_impl; the right allocate() is picked
// from the base class's own signature, so no version number has to be right.

namespace detail {
inline constexpr bool kConstAllocate =
    std::is_same_v<decltype(&c10::Allocator::allocate),
                   c10::DataPtr (c10::Allocator::*)(size_t) const>;

template <class Base, bool kConst>
struct AllocateAdapter;

template <class Base>
struct AllocateAdapter<Base, true> : Base {
  c10::DataPtr allocate(size_t n) const override { return allocate_impl(n); }
  virtual c10::DataPtr allocate_impl(size_t n) const = 0;
  // Overrides LibTorch >= 2.3's pure virtual; a plain member before.
  void copy_data(void* dest, const void* src, std::size_t count) const {
    std::memcpy(dest, src, count);
  }
};

template <class Base>
struct AllocateAdapter<Base, false> : Base {
  c10::DataPtr allocate(size_t n) override { return allocate_impl(n); }
  virtual c10::DataPtr allocate_impl(size_t n) const = 0;
  void copy_data(void* dest, const void* src, std::size_t count) const {
    std::memcpy(dest, src, count);
  }
};
}  // namespace detail

/// Base of a c10::Allocator that builds with every LibTorch: implement
/// `c10::DataPtr allocate_impl(size_t n) const`.
using CpuAllocatorBase = detail::AllocateAdapter<c10::Allocator, detail::kConstAllocate>;

// ======================================================================= autocast (amp.h)
// LibTorch 2.4 replaced the per-device autocast state functions (is_cpu_enabled, set_enabled for
// CUDA, get_autocast_gpu_dtype, ...) by ones taking a device type, and deprecated the old
// spellings for removal: under -Werror they no longer compile, so each version gets its own.

/// True when LibTorch's CPU autocast accepts float16 besides bfloat16 (added in LibTorch 2.2).
inline constexpr bool kAutocastCpuSupportsHalf = TORCH_VERSION_MAJOR > 2 ||
                                                 (TORCH_VERSION_MAJOR == 2 &&
                                                  TORCH_VERSION_MINOR >= 2);

#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)

/// Whether autocast is on for `device` (kCPU or kCUDA) on this thread.
inline bool is_autocast_enabled(c10::DeviceType device) {
  return at::autocast::is_autocast_enabled(device);
}
inline void set_autocast_enabled(c10::DeviceType device, bool enabled) {
  at::autocast::set_autocast_enabled(device, enabled);
}
/// The lower-precision type autocast casts to on `device` (kCPU or kCUDA), on this thread.
inline at::ScalarType get_autocast_dtype(c10::DeviceType device) {
  return at::autocast::get_autocast_dtype(device);
}
inline void set_autocast_dtype(c10::DeviceType device, at::ScalarType dtype) {
  at::autocast::set_autocast_dtype(device, dtype);
}

#else

namespace detail {
inline void check_autocast_device(c10::DeviceType device) {
  TORCH_CHECK(device == c10::kCPU || device == c10::kCUDA,
              "accelerate: autocast supports CPU and CUDA devices, not ", device);
}
}  // namespace detail

/// Whether autocast is on for `device` (kCPU or kCUDA) on this thread.
inline bool is_autocast_enabled(c10::DeviceType device) {
  detail::check_autocast_device(device);
  return device == c10::kCPU ? at::autocast::is_cpu_enabled() : at::autocast::is_enabled();
}
inline void set_autocast_enabled(c10::DeviceType device, bool enabled) {
  detail::check_autocast_device(device);
  if (device == c10::kCPU) {
    at::autocast::set_cpu_enabled(enabled);
  } else {
    at::autocast::set_enabled(enabled);
  }
}
/// The lower-precision type autocast casts to on `device` (kCPU or kCUDA), on this thread.
inline at::ScalarType get_autocast_dtype(c10::DeviceType device) {
  detail::check_autocast_device(device);
  return device == c10::kCPU ? at::autocast::get_autocast_cpu_dtype()
                             : at::autocast::get_autocast_gpu_dtype();
}
inline void set_autocast_dtype(c10::DeviceType device, at::ScalarType dtype) {
  detail::check_autocast_device(device);
  if (device == c10::kCPU) {
    at::autocast::set_autocast_cpu_dtype(dtype);
  } else {
    at::autocast::set_autocast_gpu_dtype(dtype);
  }
}

#endif
// ================================================================ end of autocast (amp.h)

}  // namespace accelerate::compat
