"""Experts beyond RAM: which routed experts stay in memory under a budget, and which are read on demand.

With the weights mapped from a file (checkpoint/converted.py), an expert's bytes are page-cache pages the
kernel reads in when a product touches them and may drop under memory pressure. Under `max_memory`:

- the dense parts (everything but the routed experts: attention, the dense MLP, the embedding / head, norms)
  are locked in memory (mlock), as are the hot experts: the most used by routing counts, as many as the
  budget leaves room for after the dense parts, chosen again every REBALANCE_EVERY forward passes;
- a cold expert is read from the file when routed to: its pages are asked for at once (madvise WILLNEED: the
  kernel reads them ahead while the layer's other work runs instead of faulting them page by page), and
  marked first to drop (MADV_COLD) once the layer has moved on to other experts;
- the next layer's experts are prefetched while this one computes: those it routed to in the last pass
  (consecutive tokens share many experts), where they are cold.

The weights read are the same bytes either way, so the logits are those of a fully resident model; only where
the bytes come from changes. Hit rate: the share of routed (token, expert) pairs whose expert was hot.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from dataclasses import dataclass

import torch

PAGE = mmap.PAGESIZE
REBALANCE_EVERY = 16
MADV_WILLNEED, MADV_COLD = 3, 20

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = _libc.mlock.argtypes = _libc.munlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


@dataclass
class ResidencyStats:
    budget: int
    dense_bytes: int
    expert_bytes: int  # one expert of one layer (gate_up + down, scales included)
    hot_slots: int     # experts (over all layers) the budget holds
    total_experts: int
    uses: int = 0
    hits: int = 0
    locked: bool = True  # False where mlock was refused (then the hot set is only a preference)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.uses if self.uses else 1.0

    def line(self) -> str:
        return (f"experts: {self.hot_slots}/{self.total_experts} resident under {self.budget / 2**30:.2f} GiB "
                f"(dense {self.dense_bytes / 2**30:.2f} GiB), hit rate {100 * self.hit_rate:.1f}% "
                f"of {self.uses} routed{'' if self.locked else ' (not pinned)'}")


class ExpertResidency:
    def __init__(self, decoder, budget: int):
        self.experts = [layer.experts for layer in decoder.layers if getattr(layer, "moe", False)]
        if not self.experts:
            raise ValueError("max_memory: this model has no routed experts to keep out of memory")
        if decoder.device.type != "cpu":
            raise ValueError("max_memory: applies to weights in CPU memory (the experts are read from a mapped file)")
        self.n = self.experts[0].num_experts
        expert_ids = set()
        self.ranges = []  # [layer][expert] -> [(address, length)]
        for module in self.experts:
            tensors = _tensors(module)
            expert_ids.update(id(t) for t in tensors)
            self.ranges.append([[(t.data_ptr() + e * t.stride(0) * t.element_size(), t.stride(0) * t.element_size())
                                 for t in tensors] for e in range(self.n)])
        dense = [t for t in _all_tensors(decoder) if id(t) not in expert_ids]
        per_expert = max(sum(n for _, n in layer[0]) for layer in self.ranges)
        dense_bytes = sum(t.numel() * t.element_size() for t in dense)
        total = len(self.experts) * self.n
        slots = min(total, max(0, (budget - dense_bytes) // per_expert))
        self.stats = ResidencyStats(budget, dense_bytes, per_expert, int(slots), total)
        self.counts = torch.zeros(len(self.experts), self.n, dtype=torch.float64)
        self.hot = torch.zeros(len(self.experts), self.n, dtype=torch.bool)
        self.last = [torch.empty(0, dtype=torch.long) for _ in self.experts]
        self.passes = 0
        if dense_bytes > budget:  # nothing pinned: locking more than the budget could get the process killed
            self.stats.locked = False
            print(f"gemma4: max_memory {budget / 2**30:.2f} GiB is below the dense parts "
                  f"({dense_bytes / 2**30:.2f} GiB): nothing is pinned, the kernel pages every weight", file=sys.stderr)
        for t in dense:
            self._lock(t.data_ptr(), t.numel() * t.element_size())
        for i, module in enumerate(self.experts):
            module.residency, module.residency_layer = self, i

    # ---- called by each MoE layer before its experts run ------------------------------------
    def route(self, layer: int, experts: torch.Tensor) -> None:
        flat = experts.reshape(-1)
        self.counts[layer] += torch.bincount(flat, minlength=self.n).to(torch.float64)
        hot = self.hot[layer]
        self.stats.uses += flat.numel()
        self.stats.hits += int(hot[flat].sum())
        ids = torch.unique(flat)
        cold_now = ids[~hot[ids]]
        for e in cold_now.tolist():
            self._advise(layer, e, MADV_WILLNEED)
        gone = self.last[layer][~torch.isin(self.last[layer], ids)]
        for e in gone[~hot[gone]].tolist():  # used last pass, cold, not used now: the first pages to drop
            self._advise(layer, e, MADV_COLD)
        self.last[layer] = ids
        nxt = layer + 1
        if nxt < len(self.experts):  # the next layer, while this one computes
            ahead = self.last[nxt]
            for e in ahead[~self.hot[nxt][ahead]].tolist():
                self._advise(nxt, e, MADV_WILLNEED)
        else:
            self.passes += 1
            if self.passes == 1 or self.passes % REBALANCE_EVERY == 0:
                self.rebalance()

    def rebalance(self) -> None:
        """The hot set: the `hot_slots` experts (over all layers) routed to most so far."""
        slots = self.stats.hot_slots
        want = torch.zeros_like(self.hot)
        if slots:
            # ties (experts never routed to) go to the lower layer and id: a stable order
            order = torch.argsort(-self.counts.reshape(-1), stable=True)[:slots]
            want.view(-1)[order] = True
        for layer, e in (self.hot & ~want).nonzero().tolist():
            for addr, n in self.ranges[layer][e]:
                start, end = _inner(addr, n)
                if end > start:
                    _libc.munlock(start, end - start)
        for layer, e in (want & ~self.hot).nonzero().tolist():
            for addr, n in self.ranges[layer][e]:
                self._lock(addr, n)
        self.hot = want

    def reset_stats(self) -> None:
        self.stats.uses = self.stats.hits = 0

    # ---- pages --------------------------------------------------------------------------------
    def _lock(self, addr: int, n: int) -> None:
        start, end = _outer(addr, n)
        if self.stats.locked and _libc.mlock(start, end - start) != 0:
            self.stats.locked = False
            print(f"gemma4: mlock refused (errno {ctypes.get_errno()}): the hot set is not pinned", file=sys.stderr)

    def _advise(self, layer: int, e: int, advice: int) -> None:
        for addr, n in self.ranges[layer][e]:
            start, end = _outer(addr, n) if advice == MADV_WILLNEED else _inner(addr, n)
            if end > start:
                _libc.madvise(start, end - start, advice)


def attach(decoder, budget: int) -> ExpertResidency:
    """Keep the dense parts and the hot experts within `budget` bytes resident; the rest read on demand."""
    residency = ExpertResidency(decoder, budget)
    decoder.residency = residency
    return residency


def _tensors(experts) -> list[torch.Tensor]:
    """The stacked [E, ...] tensors of an Experts module: float parameters or a QuantParam's buffers."""
    out = []
    for name in ("gate_up_proj", "down_proj"):
        w = getattr(experts, name)
        out += [w] if isinstance(w, torch.Tensor) else [t for t in w.qweight.tensors() if t is not None]
    return out


def _all_tensors(decoder) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in [*decoder.parameters(), *decoder.buffers()]:
        if id(t) not in seen and t.device.type == "cpu":
            seen.add(id(t))
            out.append(t)
    return out


def _outer(addr: int, n: int) -> tuple[int, int]:
    return addr & ~(PAGE - 1), (addr + n + PAGE - 1) & ~(PAGE - 1)


def _inner(addr: int, n: int) -> tuple[int, int]:
    """Whole pages inside [addr, addr + n): a neighbour's pages are left as they are."""
    return (addr + PAGE - 1) & ~(PAGE - 1), (addr + n) & ~(PAGE - 1)
