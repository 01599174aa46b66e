#pragma once
/// \file
/// Umbrella header of the data module: loaders, samplers, collate, sharding, gather_for_metrics.
///
/// Example:
/// \code
///   #include <accelerate/data.h>
///   accelerate::data::DataLoader loader(dataset, {.batch_size = 8, .shuffle = true});
///   for (auto& batch : accelerate::data::prepare_data_loader(loader)) train(batch);
/// \endcode

#include <accelerate/data/collate.h>
#include <accelerate/data/data_loader.h>
#include <accelerate/data/gradient_state.h>
#include <accelerate/data/sampler.h>
#include <accelerate/data/sharding.h>
