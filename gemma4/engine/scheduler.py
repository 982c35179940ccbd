"""Who runs: admission into cache rows, the KV budget, the queue, prefix reuse.

Requests wait in a first-come, first-served queue and are admitted into free cache rows. With a KV budget,
a request is admitted only when the KV it may reach (prompt + max_tokens) fits beside the running ones;
otherwise it waits until one finishes. A cancelled request leaves at the next step and its row is cleared.

Long contexts: with a prefix store, a prompt's KV is snapshotted when its prefill reaches its resume points
(the last two grid points of its chunks before its last token, runner.resume_points), and a new request
that starts with a stored prompt's tokens up to one of them resumes there and prefills only the rest, in
the chunks a fresh prefill would run: its logits are the same bits as without the store. (Positions an
answer added are computed by decode steps, not by the chunks a later prompt's prefill would run, so they
are never stored.)
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..kv import KVBudget
from ..kv import PrefixStore, prompt_key
from .sequence import Request, Sequence


class QueueFull(Exception):
    """More requests are waiting than the queue holds: try again later."""


class TooLarge(ValueError):
    """The request needs more KV memory than the whole budget: it could never run."""


@dataclass
class Stats:
    """What only the engine sees, for /metrics (plain numbers, read without the lock)."""

    decode_tokens_per_s: float = 0.0  # tokens of the last decode step over its duration
    decode_steps: int = 0
    prefix_hits: int = 0
    prefix_reused_tokens: int = 0
    draft_tokens: int = 0  # speculative decoding: tokens drafted, and those the target kept
    accepted_tokens: int = 0


@dataclass
class Running:
    """A request admitted into a cache row."""

    request: Request
    seq: Sequence
    row: int
    prefilled: int = 0  # prompt tokens already in the cache
    key: list[int] = field(default_factory=list)  # the prompt as the prefix store matches it (prompt_key)
    soft_embeds: tuple | None = None  # (embeds, mask, joined columns) over the prompt, built at its first chunk
    resume_at: list[int] = field(default_factory=list)  # the prompt's resume points (its KV there is stored)
    rings_at: tuple | None = None  # (an earlier resume point, KVCache.ring_snapshot there): the entry resumes there too
    reused: int = 0  # prompt tokens whose KV came from the prefix store
    reserved: int = 0  # bytes of the KV budget held
    hidden: torch.Tensor | None = None  # the target's state that produced the last sampled token

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.seq.prompt_ids)


class Scheduler:
    def __init__(self, cache, max_batch: int = 8, max_queue: int = 64, prefix_store: PrefixStore | None = None,
                 kv_budget: int | None = None, stats: Stats | None = None,
                 on_retire: Callable[[Running], None] | None = None):
        """cache: the engine's KVCache of max_batch rows. prefix_store: reuse of shared prefixes (None: off).
        kv_budget: bytes of KV shared by all rows (None: unbounded). on_retire: told of each row freed."""
        self.cache = cache
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefix_store = prefix_store
        self.stats = stats if stats is not None else Stats()
        self.on_retire = on_retire
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Running] = []
        self.free_rows = list(range(max_batch))
        self.budget = KVBudget(kv_budget, cache) if kv_budget is not None else None
        if self.budget is not None:  # the budget is what the cache allocates: rings and a fixed pool
            cache.fix_pool(self.budget.blocks)
        self.lock = threading.Condition()

    # ---- the queue (any thread) ---------------------------------------------------------------
    def submit(self, request: Request, bounded: bool = True) -> None:
        """Queue a request. TooLarge: it could never fit the KV budget; QueueFull (bounded): the queue is full."""
        if self.budget is not None:
            need = self._need(request)
            if need > self.budget.total:
                raise TooLarge(f"the request needs {need / 2**20:.1f} MiB of KV memory for "
                               f"{len(request.prompt_ids) + request.params.max_tokens} tokens; the KV budget "
                               f"holds {self.budget.total / 2**20:.1f} MiB beside the sliding windows")
        with self.lock:
            if bounded and len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting")
            self.waiting.append(request)
            self.lock.notify()

    def cancel(self, request: Request) -> None:
        with self.lock:
            request.cancelled = True
            self.lock.notify()

    def _need(self, request: Request) -> int:
        return self.budget.need(len(request.prompt_ids) + request.params.max_tokens)

    # ---- rows (the engine's thread, holding the lock) -----------------------------------------
    def admit(self, make_sequence: Callable[[Request], Sequence]) -> list[Running]:
        """Retire cancelled requests, drop cancelled waiting ones, admit waiting requests into free rows
        (their stored prefixes restored); returns the requests admitted now."""
        for r in [r for r in self.running if r.request.cancelled]:
            self.retire(r)
        self.waiting = collections.deque(r for r in self.waiting if not r.cancelled)
        admitted = []
        while self.waiting and self.free_rows:
            request = self.waiting[0]
            need = 0
            if self.budget is not None:
                need = self._need(request)
                if not self.budget.fits(need):
                    break  # first come, first served: it waits until a running one frees memory
                self.budget.reserve(need)
            self.waiting.popleft()
            seq = make_sequence(request)
            r = Running(request, seq, self.free_rows.pop(0), reserved=need,
                        key=prompt_key(seq.prompt_ids, seq.soft) if self.prefix_store is not None else [])
            if request.prompt_cache is None:
                self._reuse_prefix(r)
            self.running.append(r)
            admitted.append(r)
        return admitted

    def retire(self, r: Running) -> None:
        self.running.remove(r)
        self.cache.clear(r.row)
        if self.on_retire is not None:
            self.on_retire(r)
        if self.budget is not None:
            self.budget.release(r.reserved)
        self.free_rows.append(r.row)
        self.free_rows.sort()

    def fail_all(self) -> list[Request]:
        """Retire every running request and empty the queue (the model failed); returns their requests."""
        with self.lock:
            running = list(self.running)
            for r in running:
                self.retire(r)
            waiting, self.waiting = list(self.waiting), collections.deque()
        return [r.request for r in running] + waiting

    def next_prefill(self) -> Running | None:
        """The oldest request still prefilling: one chunk of it runs per step."""
        return next((r for r in self.running if not r.decoding), None)

    def decoding(self) -> list[Running]:
        """The sequences generating, in row order: consecutive rows are a slice of the cache (views) rather than
        an index (a copy of every ring per layer and step), and a row's bits do not depend on its place."""
        return sorted((r for r in self.running if r.decoding and r.seq.output_ids and not r.seq.finished),
                      key=lambda r: r.row)

    # ---- prefix reuse ------------------------------------------------------------------------
    def _reuse_prefix(self, r: Running) -> None:
        if self.prefix_store is None:
            return
        hit = self.prefix_store.lookup(r.key)
        if hit is None:
            return
        self.cache.restore(r.row, hit.snapshot, hit.length)
        r.prefilled = r.reused = hit.length
        self.stats.prefix_hits += 1
        self.stats.prefix_reused_tokens += hit.length

    def plan_resume(self, r: Running, points: list[int]) -> None:
        """At a prompt's first chunk: which of its resume points (runner.resume_points) to store."""
        if self.prefix_store is None or not points or not self.prefix_store.wants(points[-1]):
            return
        r.resume_at = [c for c in points if c > r.reused]
        if r.reused and r.resume_at:  # its entry resumes where it did too: the shared document's end
            r.rings_at = (r.reused, self.cache.ring_snapshot(r.row, r.reused))
            r.resume_at = r.resume_at[-1:]

    def prefilled_to(self, r: Running, end: int) -> None:
        """Row r's prompt is in the cache up to `end`: store its KV at its resume points."""
        r.prefilled = end
        if r.resume_at and end == r.resume_at[-1]:
            self._remember(r, r.key[:end], r.rings_at)
        elif r.resume_at and end == r.resume_at[0]:  # only the rings: the last point's snapshot holds the rest
            r.rings_at = (end, self.cache.ring_snapshot(r.row, end))

    def _remember(self, r: Running, tokens: list[int], earlier=None) -> None:
        """Snapshot row r holding `tokens` (up to a resume point of its prompt) into the prefix store;
        earlier: (an earlier resume point, the rings there) that it can resume at too."""
        r.rings_at = None
        if self.prefix_store is not None and self.prefix_store.wants(len(tokens)) \
                and not self.prefix_store.covers(tokens):
            snap = self.cache.snapshot(r.row, tokens)
            if earlier is not None:
                snap = snap.with_earlier_rings(earlier[1], earlier[0])
            self.prefix_store.add(snap)
