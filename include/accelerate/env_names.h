#pragma once
/// \file
/// The environment variables through which `accelerate launch` tells the library about the
/// sharding plugins, with Python Accelerate's names. One list, shared by the library (which
/// reads them) and the CLI (which writes them); no LibTorch needed.
///
/// Example:
/// \code
///   if (std::getenv(accelerate::env::kUseFsdp)) { /* launched with --use_fsdp */ }
/// \endcode

namespace accelerate::env {

// FSDP (FullyShardedDataParallelPlugin). Booleans are written "true"/"false".
inline constexpr const char* kUseFsdp = "ACCELERATE_USE_FSDP";
/// FULL_SHARD, SHARD_GRAD_OP, NO_SHARD, HYBRID_SHARD, HYBRID_SHARD_ZERO2, or their numbers 1-5.
inline constexpr const char* kFsdpShardingStrategy = "FSDP_SHARDING_STRATEGY";
inline constexpr const char* kFsdpOffloadParams = "FSDP_OFFLOAD_PARAMS";
/// FULL_STATE_DICT, LOCAL_STATE_DICT, SHARDED_STATE_DICT, or their numbers 1-3.
inline constexpr const char* kFsdpStateDictType = "FSDP_STATE_DICT_TYPE";
inline constexpr const char* kFsdpSyncModuleStates = "FSDP_SYNC_MODULE_STATES";
inline constexpr const char* kFsdpMinNumParams = "FSDP_MIN_NUM_PARAMS";
/// TRANSFORMER_BASED_WRAP, SIZE_BASED_WRAP, NO_WRAP.
inline constexpr const char* kFsdpAutoWrapPolicy = "FSDP_AUTO_WRAP_POLICY";
/// Comma-separated module type names.
inline constexpr const char* kFsdpTransformerClsToWrap = "FSDP_TRANSFORMER_CLS_TO_WRAP";
/// BACKWARD_PRE, BACKWARD_POST, NO_PREFETCH.
inline constexpr const char* kFsdpBackwardPrefetch = "FSDP_BACKWARD_PREFETCH";
inline constexpr const char* kFsdpForwardPrefetch = "FSDP_FORWARD_PREFETCH";
inline constexpr const char* kFsdpUseOrigParams = "FSDP_USE_ORIG_PARAMS";
inline constexpr const char* kFsdpCpuRamEfficientLoading = "FSDP_CPU_RAM_EFFICIENT_LOADING";
inline constexpr const char* kFsdpActivationCheckpointing = "FSDP_ACTIVATION_CHECKPOINTING";

// DeepSpeed (DeepSpeedPlugin).
inline constexpr const char* kUseDeepSpeed = "ACCELERATE_USE_DEEPSPEED";
inline constexpr const char* kDeepSpeedZeroStage = "ACCELERATE_DEEPSPEED_ZERO_STAGE";
inline constexpr const char* kGradientAccumulationSteps = "ACCELERATE_GRADIENT_ACCUMULATION_STEPS";
inline constexpr const char* kGradientClipping = "ACCELERATE_GRADIENT_CLIPPING";
/// none, cpu, nvme.
inline constexpr const char* kDeepSpeedOffloadOptimizerDevice =
    "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE";
inline constexpr const char* kDeepSpeedOffloadParamDevice =
    "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE";
inline constexpr const char* kDeepSpeedOffloadOptimizerNvmePath =
    "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_NVME_PATH";
inline constexpr const char* kDeepSpeedOffloadParamNvmePath =
    "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_NVME_PATH";
inline constexpr const char* kDeepSpeedZero3Init = "ACCELERATE_DEEPSPEED_ZERO3_INIT";
inline constexpr const char* kDeepSpeedZero3Save16BitModel =
    "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL";
/// Path of a DeepSpeed JSON config (`deepspeed_config_file`).
inline constexpr const char* kDeepSpeedConfigFile = "ACCELERATE_DEEPSPEED_CONFIG_FILE";

// Failure records: `accelerate launch` sets ACCELERATE_ERROR_FILE for every worker (a private
// temporary directory per attempt, `rank_<R>.json`); the library writes the process's first
// failure there as one JSON object with these fields, and the launcher names the root cause
// of a failed job from them.
inline constexpr const char* kErrorFile = "ACCELERATE_ERROR_FILE";
namespace error_record_fields {
inline constexpr const char* kRank = "rank";       // RANK, -1 when unset
inline constexpr const char* kTimeNs = "time_ns";  // CLOCK_REALTIME when recorded
inline constexpr const char* kPid = "pid";
inline constexpr const char* kMessage = "message";
inline constexpr const char* kCausedByPeer = "caused_by_peer";  // a vanished peer caused it
}  // namespace error_record_fields

}  // namespace accelerate::env
