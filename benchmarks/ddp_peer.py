#!/usr/bin/env python3
"""PyTorch's DistributedDataParallel (Gloo) on bench_training's workload: what Python Accelerate
runs underneath, as the peer of the multi-process bench_training.

Debian's torchrun breaks on Python 3.11, so start the workers with our launcher, which sets the
same variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, OMP_NUM_THREADS):

    build/bin/accelerate launch -n 2 /usr/bin/python3 benchmarks/ddp_peer.py [--steps 60]
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import python_workload  # noqa: E402

if __name__ == "__main__":
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        sys.exit("ddp_peer.py: start it with `accelerate launch -n 2` or more "
                 "(raw_loop_peer.py is the one-process peer)")
    dist.init_process_group("gloo")
    python_workload.run("ddp_peer", lambda model: torch.nn.parallel.DistributedDataParallel(model))
    dist.destroy_process_group()
