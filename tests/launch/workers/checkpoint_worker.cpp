// Started by the checkpoint launch tests.
//
//   checkpoint_worker train --steps N --out F [--save-at K --dir D] [--resume --dir D]
//                     [--auto --dir P --save-every S [--kill-rank R --kill-at K] [--stop-at K]]
//       The resumable run of tests/support/resume_training.h, as many processes as the launcher
//       started; at the end every process prints "checkpoint_worker: process <r> started at
//       step <s>" (0, or the step it resumed from), process 0 writes the final parameters to F
//       (safetensors) and prints "checkpoint_worker: OK". With --auto, checkpoints are named
//       automatically under P every S steps, and a run restarted by `accelerate launch
//       --max_restarts` resumes by itself; --kill-rank/--kill-at make process R SIGKILL itself
//       after K steps on the first attempt; --stop-at makes every process stop after K steps
//       without saving (a crash that leaves the run's checkpoints as they were).
//   checkpoint_worker save-loop --project P
//       One process that resumes from the latest checkpoint under P (if any) and then saves
//       automatically named checkpoints (total_limit 2) forever, printing "saved <c> <ms>" after
//       each: the test SIGKILLs it at arbitrary moments.

#include <accelerate/accelerator.h>
#include <accelerate/safetensors.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <exception>
#include <filesystem>
#include <iostream>
#include <string>

#include "../../support/resume_training.h"

namespace {

std::string message_of(const std::exception& e) {
  if (const auto* c10_error = dynamic_cast<const c10::Error*>(&e)) {
    return c10_error->what_without_backtrace();
  }
  return e.what();
}

int train(int argc, char** argv) {
  accelerate::testing::ResumeRun run;
  std::string out;
  for (int i = 2; i < argc; ++i) {
    const std::string arg = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw std::invalid_argument(arg + " needs a value");
      return argv[++i];
    };
    if (arg == "--steps") {
      run.total_steps = std::stoll(next());
    } else if (arg == "--save-at") {
      run.save_at = std::stoll(next());
    } else if (arg == "--dir") {
      run.directory = next();
    } else if (arg == "--resume") {
      run.resume = true;
    } else if (arg == "--auto") {
      run.automatic = true;
    } else if (arg == "--save-every") {
      run.save_every = std::stoll(next());
    } else if (arg == "--kill-rank") {
      run.kill_rank = std::stoi(next());
    } else if (arg == "--kill-at") {
      run.kill_at = std::stoll(next());
    } else if (arg == "--stop-at") {
      run.stop_at = std::stoll(next());
    } else if (arg == "--out") {
      out = next();
    } else {
      throw std::invalid_argument("unknown argument " + arg);
    }
  }
  int64_t started_at = -1;
  run.started_at = &started_at;
  auto weights = accelerate::testing::train_resumable(run);
  auto& state = accelerate::PartialState::shared();
  std::cout << "checkpoint_worker: process " << state.process_index() << " started at step "
            << started_at << std::endl;
  if (state.is_main_process() && !out.empty()) accelerate::safetensors::save_file(weights, out);
  state.wait_for_everyone();
  if (state.is_main_process()) std::cout << "checkpoint_worker: OK" << std::endl;
  return 0;
}

int save_loop(int argc, char** argv) {
  if (argc != 4 || std::strcmp(argv[2], "--project") != 0) {
    throw std::invalid_argument("usage: checkpoint_worker save-loop --project P");
  }
  accelerate::ProjectConfiguration project;
  project.project_dir = argv[3];
  project.automatic_checkpoint_naming = true;
  project.total_limit = 2;
  accelerate::Accelerator accelerator({.project_config = project});
  accelerate::testing::CrashTarget target;
  auto [model, optimizer] = accelerator.prepare(target.model, target.adam);
  accelerator.register_for_checkpointing(target.progress);
  if (accelerate::latest_checkpoint(argv[3] + std::string("/checkpoints"))) {
    accelerator.load_state();
    const auto problem = target.inconsistency();
    if (!problem.empty())
      throw std::runtime_error("resumed an inconsistent checkpoint: " + problem);
  }
  for (;;) {
    target.step_to(target.progress->steps + 1);
    const auto start = std::chrono::steady_clock::now();
    accelerator.save_state();
    const auto ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    std::cout << "saved " << target.progress->steps << " " << ms << std::endl;
  }
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc >= 2 && std::strcmp(argv[1], "train") == 0) return train(argc, argv);
    if (argc >= 2 && std::strcmp(argv[1], "save-loop") == 0) return save_loop(argc, argv);
    std::cerr << "usage: checkpoint_worker train|save-loop ...\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "checkpoint_worker: " << message_of(e) << "\n";
    return 1;
  }
}
