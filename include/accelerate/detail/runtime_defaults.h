#pragma once
/// \file
/// Process-wide settings that decide training speed on a CPU, applied when a PartialState is
/// created, so that they hold however the program was started (directly, `accelerate launch`,
/// torchrun, SLURM, mpirun). `accelerate launch` sets the same through the environment of the
/// workers it starts; these functions respect whatever the environment already says.
///
/// Example:
/// \code
///   auto env = accelerate::current_environment();
///   accelerate::detail::apply_allocator_defaults(env);
///   accelerate::detail::apply_thread_defaults(env, /*processes_on_this_machine=*/2);
/// \endcode

#include <accelerate/environment.h>

#include <string>

namespace accelerate::detail {

/// glibc hands every freed block above its mmap threshold (and the free top of its heap above
/// the trim threshold) back to the kernel; the next training step faults the same pages in again
/// (measured: a 64 MiB tensor allocated and freed in a loop costs 270 ms per round with glibc's
/// defaults, 5 ms without the faults). LibTorch's CPU allocator does not cache, so this keeps
/// freed blocks up to 1 GiB in the heap (`mallopt`), the same values `accelerate launch` puts in
/// GLIBC_TUNABLES. Does nothing when the environment chose for itself (GLIBC_TUNABLES,
/// MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ set, even empty), on other C libraries, or
/// after the first call. Returns what it did, for logs.
std::string apply_allocator_defaults(const EnvMap& env);

/// With several processes on one machine, every OpenMP and OpenBLAS pool would start one thread
/// per core in each process. Unless OMP_NUM_THREADS, OPENBLAS_NUM_THREADS or MKL_NUM_THREADS is
/// set, this gives each pool max(1, cores / processes_on_this_machine) threads (what
/// `accelerate launch` and torchrun put in the environment). Returns what it did, for logs.
std::string apply_thread_defaults(const EnvMap& env, int processes_on_this_machine);

}  // namespace accelerate::detail
