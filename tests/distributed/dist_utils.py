"""Launch a function on N CPU processes over gloo (torch.multiprocessing spawn), under a timeout.

Never Lightning's strategy="ddp" inside pytest (it re-runs pytest as rank 1): layer-level tests use
`run_distributed`, Lightning-level tests launch `python train.py` in a subprocess (see train_runs.py).
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple[Any, ...], errq: Any) -> None:
    torch.set_num_threads(1)
    sys.path.insert(0, ROOT)
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
        )
        fn(rank, world, *args)
        dist.barrier()
    except BaseException:
        errq.put((rank, traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 120.0) -> None:
    """Run fn(rank, world, *args) on `world` spawned processes; re-raise the first failure; kill on timeout."""
    ctx = mp.get_context("spawn")
    errq = ctx.SimpleQueue()
    pc = mp.start_processes(
        _entry, args=(world, free_port(), fn, args, errq), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    try:
        while not pc.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed test did not finish within {timeout} s (hang?)")
    except mp.ProcessRaisedException as err:
        msgs = []
        while not errq.empty():
            rank, text = errq.get()
            msgs.append(f"rank {rank}:\n{text}")
        raise AssertionError("\n".join(msgs) or str(err)) from None
    finally:
        for p in pc.processes:
            if p.is_alive():
                p.kill()
