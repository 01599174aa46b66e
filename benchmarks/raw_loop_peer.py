#!/usr/bin/env python3
"""One process, the plain PyTorch training loop of bench_training's workload (no DDP): the
Python side of "a raw C++ loop no slower than the same loop in Python on the same LibTorch".

    OMP_NUM_THREADS=1 /usr/bin/python3 benchmarks/raw_loop_peer.py [--steps 60] [--reps 5]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import python_workload  # noqa: E402

if __name__ == "__main__":
    python_workload.run("raw_loop_peer", lambda model: model)
