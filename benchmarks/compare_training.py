#!/usr/bin/env python3
"""Runs bench_training and its Python peers in one go, interleaved, and prints the ratios the
training-step goals are stated in (benchmarks/README.md).

    /usr/bin/python3 benchmarks/compare_training.py [--build build] [--rounds 3] [--steps 60]

Each round runs, in this order: the one-process C++ benchmark started directly (raw LibTorch loop
and Accelerator loop in one process), the same with accelerate-cpp's allocator settings switched
off (what a plain LibTorch program gets), the Python raw loop, the two-process C++ benchmark
through `accelerate launch`, and PyTorch DDP through the same launcher. Every run has one thread
per process (OMP_NUM_THREADS=OPENBLAS_NUM_THREADS=1). Reported: the median over rounds of each
number, and the ratios.
"""
import argparse
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PYTHON = "/usr/bin/python3"  # Debian's, with python3-torch


def run(cmd, env_extra, prefix):
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    env.update(env_extra)
    for name in [k for k, v in env_extra.items() if v is None]:
        env.pop(name, None)
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"compare_training: {' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}{out.stderr}")
    results = {}
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            _, key, value = line.split()
            results[prefix + key] = float(value)
    return results


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--build", default="build")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    bench = os.path.join(args.build, "benchmarks", "bench_training")
    launcher = os.path.join(args.build, "bin", "accelerate")
    common = ["--steps", str(args.steps), "--reps", str(args.reps)]
    plain = {"ACCELERATE_CPU_CACHE_MB": "0", "GLIBC_TUNABLES": ""}
    runs = [
        ("cpp.", [bench] + common, {}),
        ("plain.", [bench] + common, plain),
        ("py.", [PYTHON, os.path.join(HERE, "raw_loop_peer.py")] + common, {}),
        ("cpp.", [launcher, "launch", "-n", "2", bench] + common, {}),
        ("ddp.", [launcher, "launch", "-n", "2", PYTHON, os.path.join(HERE, "ddp_peer.py")] + common,
         {}),
    ]
    collected = {}
    for round_ in range(args.rounds):
        for prefix, cmd, env in runs:
            for key, value in run(cmd, env, prefix).items():
                collected.setdefault(key, []).append(value)
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    m = {key: statistics.median(values) for key, values in collected.items()}

    def row(label, value, goal=""):
        print(f"| {label} | {value} | {goal} |")

    print(f"medians of {args.rounds} rounds; 1 thread per process; samples/s unless noted\n")
    print("| measurement | value | goal |")
    print("|---|---|---|")
    for size in ("tiny", "medium"):
        raw = m[f"cpp.{size}_1p_raw_samples_per_s"]
        acc = m[f"cpp.{size}_1p_accelerator_samples_per_s"]
        plain_raw = m[f"plain.{size}_1p_raw_samples_per_s"]
        py = m[f"py.{size}_1p_samples_per_s"]
        ours = m[f"cpp.{size}_2p_samples_per_s"]
        ddp = m[f"ddp.{size}_2p_samples_per_s"]
        row(f"{size}: 1 process, raw C++ loop", f"{raw:.0f}")
        row(f"{size}: 1 process, Accelerator loop", f"{acc:.0f}")
        row(f"{size}: Accelerator / raw, time per step", f"{raw / acc:.3f}", "<= 1.02")
        row(f"{size}: raw C++ loop in a plain LibTorch process (no accelerate-cpp settings)",
            f"{plain_raw:.0f}")
        row(f"{size}: 1 process, raw Python loop (same LibTorch)", f"{py:.0f}")
        row(f"{size}: raw C++ / raw Python, samples/s", f"{raw / py:.2f}", ">= 1")
        row(f"{size}: 2 processes, accelerate-cpp (exact averaging)", f"{ours:.0f}")
        row(f"{size}: 2 processes, PyTorch DDP", f"{ddp:.0f}")
        goal = ">= 3" if size == "tiny" else ">= 1.3"
        row(f"{size}: accelerate-cpp / PyTorch DDP", f"{ours / ddp:.2f}", goal)
        row(f"{size}: 2 processes / 1 process raw C++", f"{ours / raw:.2f}",
            ">= 1.5" if size == "medium" else "")
        row(f"{size}: 2 processes / 1 process raw Python", f"{ours / py:.2f}")
        row(f"{size}: 2 processes with no_sync (no communication: the ceiling)",
            f"{m[f'cpp.{size}_2p_no_sync_samples_per_s']:.0f}")
        row(f"{size}: 2 processes, bf16 communication hook",
            f"{m[f'cpp.{size}_2p_bf16_hook_samples_per_s']:.0f}")
        row(f"{size}: gradient communication per step (ms)",
            f"{m[f'cpp.{size}_2p_communication_ms_per_step']:.2f}")
        row(f"{size}: share of it hidden behind backward",
            f"{m[f'cpp.{size}_2p_hidden_share']:.2f}")


if __name__ == "__main__":
    main()
