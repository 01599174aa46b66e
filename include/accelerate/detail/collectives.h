#pragma once
/// \file
/// Tensor-level collectives over a PartialState's process group. The public operations in
/// operations.h are built on these; users normally call those instead.
///
/// Every function here:
///  - is the identity (or the trivial answer) for a single process;
///  - takes the name of the user-facing operation, so that errors name what the user called;
///  - first has every process state the call's fingerprint (operation, name, dtype, shape, in
///    one sequence per process group; see DirectGloo::agree), always, not only in debug mode:
///    calls that do not pair up throw on every process, listing each process's call, before any
///    payload moves;
///  - turns a stuck collective into an error after the state's timeout naming the operation and
///    the processes that did not arrive.
///
/// Example:
/// \code
///   at::Tensor summed = accelerate::detail::all_reduce(state, "reduce", t, c10d::ReduceOp::SUM);
/// \endcode

#include <accelerate/state.h>

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/Types.hpp>

#include <memory>
#include <string>
#include <vector>

namespace accelerate::detail {

class DirectWork;
struct CallFingerprint;

/// Every process states `fingerprint` for its next collective; throws on every process when they
/// differ (see DirectGloo::agree). Through PartialState::direct() when there is one, else through
/// the process group's all-gather of the fixed-size fingerprint.
void agree(const PartialState& state, const CallFingerprint& fingerprint);

/// Reduces `t` over all processes. Returns a new tensor on `t`'s device and dtype (dtypes Gloo
/// lacks, such as bfloat16 and bool, are reduced in a wider type and converted back).
at::Tensor all_reduce(const PartialState& state, const char* op, const at::Tensor& t,
                      c10d::ReduceOp reduce_op);

/// Reduces `buf` in place over all processes. `buf` must be contiguous, on the communication
/// device (the CPU for Gloo) and of a dtype the backend reduces (not bfloat16 or bool): the
/// caller owns it, so no copy is made. Large tensors are dominated by copies and page faults of
/// fresh buffers, which is why reduce() goes through here with the one copy it needs anyway.
void all_reduce_(const PartialState& state, const char* op, at::Tensor& buf,
                 c10d::ReduceOp reduce_op);

/// True when all_reduce_ can work on `t` directly (see there).
bool reducible_in_place(const PartialState& state, const at::Tensor& t);

/// Every process's `t`, indexed by process. All must have the same shape and dtype.
std::vector<at::Tensor> all_gather(const PartialState& state, const char* op, const at::Tensor& t);

/// Process `src`'s `t`, on every process. The others' `t` gives the expected shape and dtype.
at::Tensor broadcast(const PartialState& state, const char* op, const at::Tensor& t, int src);

/// Every process's byte string, indexed by process; lengths may differ.
std::vector<std::string> all_gather_bytes(const PartialState& state, const char* op,
                                          const std::string& bytes);

/// Process `src`'s byte string, on every process.
std::string broadcast_bytes(const PartialState& state, const char* op, const std::string& bytes,
                            int src);

/// Waits for `work`; a failure or timeout becomes an error naming `op` and this process.
void wait(const PartialState& state, const char* op, const c10::intrusive_ptr<compat::Work>& work);
/// The same for a collective running on PartialState::direct()'s worker.
void wait(const PartialState& state, const char* op, const std::shared_ptr<DirectWork>& work);

/// Blocks until every process arrives.
void barrier(const PartialState& state, const char* op);

}  // namespace accelerate::detail
