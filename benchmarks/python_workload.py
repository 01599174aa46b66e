"""The training-step workload of bench_training.cpp, in Python, for its peers.

batch 64 per process, SGD lr 1e-3, MSE loss, MLPs tiny 8-16-1 and medium 512-2048-2048-512 with
ReLU between layers, 5 warm-up steps, then timed steps between barriers; medians over
repetitions. Shared by raw_loop_peer.py (one process, no DDP) and ddp_peer.py (PyTorch DDP).
"""
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

BATCH = 64
WARMUP = 5
# name, in, hidden, out, timed steps = --steps * factor
SIZES = [("tiny", 8, 16, 1, 40), ("medium", 512, 2048, 512, 1)]


def option(name, default):
    return type(default)(sys.argv[sys.argv.index(name) + 1]) if name in sys.argv else default


def make_mlp(d_in, hidden, d_out):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, d_out))


def run(label, wrap):
    """Times the workload; `wrap(model)` returns the model to train (DDP or the model itself)."""
    steps = option("--steps", 60)
    reps = option("--reps", 5)
    only = option("--only", "")
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0

    def barrier():
        if dist.is_initialized():
            dist.barrier()

    if rank == 0:
        print(f"{label}: {world} process(es), torch {torch.__version__}, torch threads "
              f"{torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
              f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}), batch "
              f"{BATCH}/process, {reps} repetitions, median", flush=True)
    for name, d_in, hidden, d_out, factor in SIZES:
        if only and only != name:
            continue
        timed = steps * factor
        model = wrap(make_mlp(d_in, hidden, d_out))
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        torch.manual_seed(1 + rank)
        x, y = torch.randn(BATCH, d_in), torch.randn(BATCH, d_out)

        def step():
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()

        times = []
        for _ in range(reps):
            for _ in range(WARMUP):
                step()
            barrier()
            start = time.perf_counter()
            for _ in range(timed):
                step()
            barrier()
            times.append((time.perf_counter() - start) / timed)
        t = statistics.median(times)
        if rank == 0:
            key = f"{name}_{world}p"
            print(f"{name} ({d_in}-{hidden}-{hidden}-{d_out}, {timed} steps): {t * 1e3:.3f} ms/step ; "
                  f"{BATCH * world / t:.0f} samples/s", flush=True)
            print(f"RESULT {key}_samples_per_s {BATCH * world / t:.6g}", flush=True)
