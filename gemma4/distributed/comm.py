"""The collectives the parallel model uses, each counted: bytes all-reduced, gathered and broadcast.

Every collective of the sharded model goes through these functions, so the traffic counts (bench/
distributed_traffic.py) see all of it and a failed or timed-out collective is reported the same way
everywhere: a DistributedError naming the operation (a dead peer, a gloo timeout).
"""

from __future__ import annotations

import collections
import pickle

import torch
import torch.distributed as dist


class DistributedError(RuntimeError):
    """A rank died, hung past the timeout, or the process group could not be formed."""


class Traffic:
    """Bytes this rank handed to each kind of collective, and how many calls (reset() between measurements)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.bytes: collections.Counter = collections.Counter()
        self.calls: collections.Counter = collections.Counter()

    def add(self, kind: str, nbytes: int) -> None:
        self.bytes[kind] += nbytes
        self.calls[kind] += 1


traffic = Traffic()

# The runtime group (its timeout bounds how long a rank waits for a dead or hung peer) and the device its
# messages travel through (NCCL: the rank's GPU); set by group.join.
GROUP = None
DEVICE = torch.device("cpu")


def _failed(what: str, e: BaseException) -> DistributedError:
    return DistributedError(f"distributed {what} failed (a rank died or stopped answering): {e}")


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of t, in place (t is returned)."""
    traffic.add("all_reduce", t.numel() * t.element_size())
    try:
        dist.all_reduce(t, group=GROUP)
    except (RuntimeError, ValueError) as e:
        raise _failed("all-reduce", e) from e
    return t


def gather_last(t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Rank 0: every rank's t [..., sizes[r]] concatenated along the last dimension; other ranks: their own t.
    Pieces are padded to the largest size (a collective's buffers must agree)."""
    width = max(sizes)
    pad = torch.nn.functional.pad(t, (0, width - t.shape[-1])).contiguous()
    traffic.add("gather", pad.numel() * pad.element_size())
    rank = dist.get_rank()
    parts = [torch.empty_like(pad) for _ in sizes] if rank == 0 else None
    try:
        dist.gather(pad, parts, dst=0, group=GROUP)
    except (RuntimeError, ValueError) as e:
        raise _failed("gather", e) from e
    if rank != 0:
        return t
    return torch.cat([p[..., :n] for p, n in zip(parts, sizes)], dim=-1)


def broadcast_message(message=None):
    """Rank 0 sends `message` (any picklable object, tensors included) to every rank; each rank returns it.
    Two broadcasts: the length, then the bytes."""
    rank, device, group = dist.get_rank(), DEVICE, GROUP
    try:
        if rank == 0:
            data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
            size = torch.tensor([len(data)], dtype=torch.long, device=device)
            dist.broadcast(size, 0, group=group)
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
            dist.broadcast(buf, 0, group=group)
            traffic.add("broadcast", len(data) + 8)
            return message
        size = torch.zeros(1, dtype=torch.long, device=device)
        dist.broadcast(size, 0, group=group)
        buf = torch.empty(int(size), dtype=torch.uint8, device=device)
        dist.broadcast(buf, 0, group=group)
    except (RuntimeError, ValueError) as e:
        raise _failed("broadcast", e) from e
    return pickle.loads(buf.cpu().numpy().tobytes())
