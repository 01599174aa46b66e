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

#include <torch/version.h>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <chrono>
#include <string>

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

}  // namespace accelerate::compat
