#!/usr/bin/env python3
"""Python DDP peer for bench_training: the same MLPs, batches and steps with PyTorch's own
DistributedDataParallel (Gloo), so the two can be compared on one machine.

Debian's torchrun breaks on Python 3.11, so start the workers with our launcher, which sets the
same variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, OMP_NUM_THREADS):

    build/bin/accelerate launch -n 2 /usr/bin/python3 benchmarks/ddp_peer.py
"""
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

SIZES = [("tiny", 32, 64, 10, 64), ("medium", 512, 1024, 512, 256)]


def main():
    steps = int(sys.argv[sys.argv.index("--steps") + 1]) if "--steps" in sys.argv else 30
    reps = int(sys.argv[sys.argv.index("--reps") + 1]) if "--reps" in sys.argv else 5
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    if rank == 0:
        print(f"ddp_peer: {world} process(es), torch threads {torch.get_num_threads()} "
              f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), torch "
              f"{torch.__version__}, {steps} steps x {reps} repetitions, median", flush=True)
    for name, d_in, hidden, d_out, batch in SIZES:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.ReLU(),
                                    torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
                                    torch.nn.Linear(hidden, d_out))
        if world > 1:
            model = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        x, y = torch.randn(batch, d_in), torch.randn(batch, d_out)

        def step():
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()

        times = []
        for _ in range(reps):
            for _ in range(3):
                step()
            start = time.perf_counter()
            for _ in range(steps):
                step()
            times.append((time.perf_counter() - start) / steps)
        t = statistics.median(times)
        if rank == 0:
            print(f"{name} ({d_in}-{hidden}-{hidden}-{d_out}, batch {batch}/process): "
                  f"{t * 1e3:.3f} ms/step ; {batch * world / t:.0f} samples/s", flush=True)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
