#pragma once
/// \file
/// Umbrella header: everything a training program uses.
///
/// Example:
/// \code
///   #include <accelerate/accelerate.h>
///   int main() {
///     auto& state = accelerate::PartialState::shared();
///     state.print("hello from ", state.num_processes(), " processes");
///   }
/// \endcode

#include <accelerate/accelerator.h>
#include <accelerate/big_modeling.h>
#include <accelerate/checkpoint_state.h>
#include <accelerate/checkpointing.h>
#include <accelerate/compat.h>
#include <accelerate/data.h>
#include <accelerate/device_map.h>
#include <accelerate/environment.h>
#include <accelerate/fsdp.h>
#include <accelerate/logging.h>
#include <accelerate/memory.h>
#include <accelerate/offload.h>
#include <accelerate/operations.h>
#include <accelerate/optimizer_state.h>
#include <accelerate/plugins.h>
#include <accelerate/progress.h>
#include <accelerate/random.h>
#include <accelerate/safetensors.h>
#include <accelerate/state.h>
#include <accelerate/tracking.h>
#include <accelerate/tree.h>
#include <accelerate/zero.h>
