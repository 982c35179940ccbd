"""Forming the process group: under torchrun (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment)
every process joins it; otherwise this process is rank 0 and starts the other ranks on this machine
(subprocesses of `python -m gemma4.distributed.worker`, rendezvous on 127.0.0.1 at a free port), and a
watchdog thread follows them: a rank that exits is reported, and the others are ended so that no
collective waits on it. gloo on the CPU, NCCL on CUDA.

Three timeouts: forming the group (RENDEZVOUS_TIMEOUT_S: a rank that never comes is an error, not a wait);
agreeing that every rank is loaded (LOAD_TIMEOUT_S: a big shard takes minutes; a rank that dies meanwhile
closes its sockets and fails the wait at once); the runtime group's (GEMMA4_DIST_TIMEOUT seconds, default
60), which bounds how long any rank waits for a peer that died or hangs.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import threading
import time

import torch
import torch.distributed as dist

from . import comm
from .comm import DistributedError

RENDEZVOUS_TIMEOUT_S = 300
LOAD_TIMEOUT_S = 1800
_load_group = None


def runtime_timeout() -> float:
    return float(os.environ.get("GEMMA4_DIST_TIMEOUT", "60"))


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device: torch.device) -> torch.device:
    """NCCL: each rank on its own GPU (LOCAL_RANK under torchrun)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def join(rank: int, world: int, device: torch.device, init_method: str | None = None) -> None:
    """Join the group as `rank` of `world` (init_method None: the environment's MASTER_ADDR / MASTER_PORT)."""
    global _load_group
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend_for(device), init_method=init_method or "env://", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=RENDEZVOUS_TIMEOUT_S))
        _load_group = dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=LOAD_TIMEOUT_S))
        comm.GROUP = dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=runtime_timeout()))
    except (RuntimeError, ValueError) as e:
        raise DistributedError(f"could not form the group of {world} ranks: {e}") from e
    comm.DEVICE = device


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    comm.GROUP = None


def loaded() -> None:
    """Every rank has its shard (the default group's long timeout: ranks load at their own pace)."""
    try:
        dist.barrier(group=_load_group)
    except (RuntimeError, ValueError) as e:
        raise DistributedError(f"a rank failed while loading its shard: {e}") from e


def _report(reason: str) -> None:
    print(f"gemma4: {reason}", file=sys.stderr, flush=True)


class Children:
    """The worker ranks this process started, and the watchdog that follows them."""

    def __init__(self, procs: list[subprocess.Popen]):
        self.procs = procs  # rank r + 1 at index r
        self.stopping = False
        self.on_exit = _report  # called once, with a reason, when a rank exits before stop()

    def watch(self) -> None:
        threading.Thread(target=self._watch, name="gemma4-rank-watchdog", daemon=True).start()

    def _watch(self) -> None:
        while not self.stopping:
            for r, p in enumerate(self.procs, 1):
                code = p.poll()
                if code is not None and not self.stopping:
                    self.end()  # no rank waits on the dead one: their sockets close, collectives fail now
                    if self.on_exit is not None:
                        self.on_exit(f"rank {r} exited with status {code}")
                    return
            time.sleep(0.2)

    def end(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()

    def wait(self, timeout: float = 10.0) -> None:
        self.stopping = True
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()


def spawn(world: int, load_args: dict, tensor_parallel: int, expert_parallel: int,
          device: torch.device) -> tuple[str, Children]:
    """Start ranks 1 .. world-1 on this machine; (the init method rank 0 joins with, the children)."""
    addr = f"tcp://127.0.0.1:{free_port()}"
    procs = []
    for r in range(1, world):
        spec = dict(load_args, rank=r, world=world, init_method=addr, tensor_parallel=tensor_parallel,
                    expert_parallel=expert_parallel, device=str(device))
        procs.append(subprocess.Popen([sys.executable, "-m", "gemma4.distributed.worker", json.dumps(spec)],
                                      stdin=subprocess.DEVNULL))
    return addr, Children(procs)
