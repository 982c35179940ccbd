"""Tensor and expert parallelism on torch.distributed: one model over several processes and machines.

    sharding.py  which part of each weight a rank holds (Plan.cut: the one slicing function)
    layers.py    the parallel layers and where their collectives go
    comm.py      the collectives, counted (traffic) and failing loudly (DistributedError)
    mirror.py    rank 0 drives (ShardedDecoder, MirroredCache), the other ranks follow (follow)
    group.py     forming the group: torchrun, or ranks started on this machine; the watchdog
    shard.py     building a rank's decoder through model.load.build_decoder
    worker.py    `python -m gemma4.distributed.worker`: a rank started by rank 0

load_decoder() is what gemma4.load(..., tensor_parallel=N, expert_parallel=N) calls.
"""

from __future__ import annotations

import atexit
import os
import sys

import torch

from .comm import DistributedError, traffic
from .sharding import Plan

__all__ = ["DistributedError", "Plan", "load_decoder", "traffic"]


def load_decoder(checkpoint, load_args: dict, dtype: torch.dtype, device: torch.device, progress: bool,
                 tensor_parallel: int, expert_parallel: int):
    """Rank 0's decoder over a group of max(tensor_parallel, expert_parallel) ranks. Under torchrun this process
    joins as its RANK; any other rank follows rank 0 here until it stops, then exits (it never returns). Outside
    torchrun this process is rank 0 and starts the others on this machine (load_args: how they load the model:
    path, dtype, quantize)."""
    from . import group
    from .mirror import Link, follow
    from .shard import build_shard

    plan0 = Plan.of(0, tensor_parallel, expert_parallel)
    if not plan0.tensor and not checkpoint.config.enable_moe_block:
        raise ValueError("expert_parallel: this model has no routed experts (split it with tensor_parallel)")
    world = plan0.world
    device = group.rank_device(device)
    children = None
    if group.under_torchrun():
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if size != world:
            raise ValueError(f"tensor_parallel / expert_parallel {world}: torchrun started {size} processes")
        group.join(rank, world, device)
    else:
        rank = 0
        init, children = group.spawn(world, load_args, tensor_parallel, expert_parallel, device)
        children.watch()
        try:
            group.join(0, world, device, init)
        except DistributedError:
            children.end()
            raise
    plan = Plan.of(rank, tensor_parallel, expert_parallel)
    try:
        decoder = build_shard(checkpoint, plan, dtype, device, progress=progress and rank == 0,
                              quantize=load_args.get("quantize"))
        group.loaded()
    except BaseException:
        if children is not None:
            children.end()
        raise
    if rank != 0:
        follow(decoder)
        sys.exit(0)
    link = Link(plan.tensor)
    decoder.link = link
    if children is not None:
        children.on_exit = link.fail
        link.on_failure.append(lambda reason: children.end())
    link.heartbeat(group.runtime_timeout() / 3)

    def close():
        if children is not None:
            children.stopping = True  # the ranks' exits from here on are expected
        link.close()
        if children is not None:
            children.wait()
        group.leave()

    decoder._closer = close
    atexit.register(decoder.close)
    return decoder
