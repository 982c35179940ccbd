"""Continuous batching: requests join and leave the running batch between decode steps.

One thread owns the model. Each iteration it admits waiting requests into free cache rows, runs one
prefill chunk of the oldest request still prefilling (so a long prompt never stalls the others for
longer than a chunk), then one decode step over every sequence that is generating. Each sequence keeps
its own sampling state (generator, penalties, grammar constraint, stop conditions). A cancelled request
leaves at the next step and its row is cleared for the next one.

Long contexts: with a prefix store, a prompt's KV is snapshotted when its prefill reaches its resume
points (the last two grid points of its chunks before its last token, engine.resume_points), and a new
request that starts with a stored prompt's tokens up to one of them resumes there and prefills only the
rest, in the chunks a fresh prefill would run: its logits are the same bits as without the store. (Positions an answer added
are computed by decode steps, not by the chunks a later prompt's prefill would run, so they are never
stored.) With a KV budget, a request is admitted only when the KV it may reach (prompt + max_tokens)
fits beside the running ones; otherwise it waits in the queue until one finishes.

Speculative decoding (speculative=K): each generating sequence drafts on its own (its own adaptive K;
none for a request under a grammar), one forward verifies every row's drafts together, and each row is
rolled back past its rejected drafts.

Outputs go to each request's `emit` callback, called on the scheduler thread.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import speculative as spec
from .engine import PREFILL_CHUNK, Sequence, chunk_end, joined_columns, resume_points, soft_embeds
from .kv import KVBudget, PrefixStore, prompt_key
from .sampling import SamplingParams, apply_penalties, sample


class QueueFull(Exception):
    """More requests are waiting than the queue holds: try again later."""


class TooLarge(ValueError):
    """The request needs more KV memory than the whole budget: it could never run."""


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


@dataclass
class RequestOutput:
    """What one request produced in one step."""

    token_id: int | None
    text: str
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    logprob: TokenLogprob | None = None
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix store


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[RequestOutput], None]
    logprobs: int | None = None  # None: none; k: the chosen token's logprob and the k most likely
    constraint: object | None = None  # has mask_logits(logits), accept(token), done
    soft: list = field(default_factory=list)  # image soft tokens: (offset in prompt_ids, [n, hidden] embeddings)
    id: int = field(default_factory=itertools.count().__next__)
    cancelled: bool = False


@dataclass
class _Running:
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


@dataclass
class Stats:
    """What only the scheduler sees, for /metrics (plain numbers, read without the lock)."""

    decode_tokens_per_s: float = 0.0  # tokens of the last decode step over its duration
    decode_steps: int = 0
    prefix_hits: int = 0
    prefix_reused_tokens: int = 0
    draft_tokens: int = 0  # speculative decoding: tokens drafted, and those the target kept
    accepted_tokens: int = 0


class Scheduler:
    def __init__(self, model, max_batch: int = 8, max_queue: int = 64, prefill_chunk: int = PREFILL_CHUNK,
                 prefix_store: PrefixStore | None = None, ring_tail: int = 0,
                 kv_budget: int | None = None, kv_dtype: str = "float", speculative: int = 0, drafter=None):
        """prefix_store: reuse of shared prefixes (None: off). ring_tail: extra sliding-ring slots (at least
        what speculation rolls back).
        kv_budget: bytes of KV shared by all rows (None: unbounded). kv_dtype: "float" or "int8".
        speculative: tokens drafted per step at most (0: off); drafter: a speculative.Drafter (default:
        prompt lookup)."""
        self.model = model
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.prefix_store = prefix_store
        self.speculative = spec.check_k(speculative)
        self.drafter = (drafter if drafter is not None else spec.PromptLookup()) if speculative else None
        ring_tail = max(ring_tail, self.speculative)  # a verify step rolls the rings back that far
        self.stats = Stats()
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: list[_Running] = []
        self._free_rows = list(range(max_batch))
        self._cache = model.decoder.new_cache(batch=max_batch, capacity=256, tail=ring_tail, kv_dtype=kv_dtype)
        self.budget = KVBudget(kv_budget, self._cache) if kv_budget is not None else None
        self._draft_room = spec.draft_room(self._cache)
        if self.budget is not None:  # the budget is what the cache allocates: rings and a fixed pool
            self._cache.fix_pool(self.budget.blocks)
        self._lock = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    # ---- called from other threads ----------------------------------------------------------
    def start(self) -> "Scheduler":
        self._thread = threading.Thread(target=self._loop, name="gemma4-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()

    def submit(self, request: Request) -> None:
        if self.budget is not None:
            need = self._need(request)
            if need > self.budget.total:
                raise TooLarge(f"the request needs {need / 2**20:.1f} MiB of KV memory for "
                               f"{len(request.prompt_ids) + request.params.max_tokens} tokens; the KV budget "
                               f"holds {self.budget.total / 2**20:.1f} MiB beside the sliding windows")
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(request)
            self._lock.notify()

    def cancel(self, request: Request) -> None:
        with self._lock:
            request.cancelled = True
            self._lock.notify()

    def _need(self, request: Request) -> int:
        return self.budget.need(len(request.prompt_ids) + request.params.max_tokens)

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    # ---- the scheduler thread -----------------------------------------------------------------
    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                while self._next():
                    self._step()
        except BaseException as e:  # the model failed: every request gets an answer, not a hang
            self.error = e
            for r in [*self._running, *self._waiting]:
                request = r.request if isinstance(r, _Running) else r
                request.emit(RequestOutput(None, "", True, "error", len(request.prompt_ids), 0))
            raise

    def step(self) -> bool:
        """One iteration on the caller's thread, for a scheduler whose thread is not started: admit waiting
        requests, run one prefill chunk and one decode step. False when there was nothing to do."""
        if self._thread is not None:
            raise RuntimeError("Scheduler.step: the scheduler's own thread is running")
        with torch.inference_mode():
            with self._lock:
                self._admit()
                if not self._running:
                    return False
            self._step()
            return True

    def _next(self) -> bool:
        """Wait until there is work; admit waiting requests into free rows. False: shut down."""
        with self._lock:
            while not self._stop and not self._running and not self._waiting:
                self._lock.wait()
            if self._stop:
                return False
            self._admit()
            return True

    def _admit(self) -> None:
        """Retire cancelled requests, drop cancelled waiting ones, admit waiting requests into free rows
        (called holding the lock)."""
        for r in [r for r in self._running if r.request.cancelled]:
            self._retire(r)
        kept = collections.deque(r for r in self._waiting if not r.cancelled)
        self._waiting = kept
        while self._waiting and self._free_rows:
            request = self._waiting[0]
            need = 0
            if self.budget is not None:
                need = self._need(request)
                if not self.budget.fits(need):
                    break  # first come, first served: it waits until a running one frees memory
                self.budget.reserve(need)
            self._waiting.popleft()
            tok = self.model.tokenizer
            seq = Sequence(request.prompt_ids, request.params, self.model.eos_token_ids,
                           tok.stream() if tok is not None else None, soft=request.soft)
            r = _Running(request, seq, self._free_rows.pop(0), reserved=need,
                         key=prompt_key(seq.prompt_ids, seq.soft) if self.prefix_store is not None else [])
            if self.speculative and request.constraint is None:
                seq.speculation = spec.Speculation(spec.AdaptiveK(self.speculative))
            self._reuse_prefix(r)
            self._running.append(r)

    def _reuse_prefix(self, r: _Running) -> None:
        if self.prefix_store is None:
            return
        hit = self.prefix_store.lookup(r.key)
        if hit is None:
            return
        self._cache.restore(r.row, hit.snapshot, hit.length)
        r.prefilled = r.reused = hit.length
        self.stats.prefix_hits += 1
        self.stats.prefix_reused_tokens += hit.length

    def _remember(self, r: _Running, tokens: list[int], earlier=None) -> None:
        """Snapshot row r holding `tokens` (up to a resume point of its prompt) into the prefix store;
        earlier: (an earlier resume point, the rings there) that it can resume at too."""
        r.rings_at = None
        if self.prefix_store is not None and self.prefix_store.wants(len(tokens)) \
                and not self.prefix_store.covers(tokens):
            snap = self._cache.snapshot(r.row, tokens)
            if earlier is not None:
                snap = snap.with_earlier_rings(earlier[1], earlier[0])
            self.prefix_store.add(snap)

    def _retire(self, r: _Running) -> None:
        self._running.remove(r)
        self._cache.clear(r.row)
        if self.drafter is not None:
            spec.release(self.drafter, r.row)
        if self.budget is not None:
            self.budget.release(r.reserved)
        self._free_rows.append(r.row)
        self._free_rows.sort()

    def _step(self) -> None:
        prefilling = [r for r in self._running if not r.decoding]
        if prefilling:
            self._prefill_chunk(prefilling[0])
        decoding = [r for r in self._running if r.decoding and r.seq.output_ids and not r.seq.finished]
        if decoding:
            start = time.perf_counter()
            decoder = self.model.decoder
            plans = [self._draft(r) for r in decoding]
            ids, pos = spec.verify_batch([p[:3] for p in plans], 0, decoder.device)
            hidden = decoder(ids, pos, self._cache.view([r.row for r in decoding]))
            logits = spec.verify_logits(decoder, hidden, pos)  # one head call for every row's positions
            tokens = 0
            for b, (r, (_, position, drafts, q)) in enumerate(zip(decoding, plans)):
                if not drafts:
                    r.hidden = hidden[b, 0]
                    self._sample(r, logits[b][0])
                    tokens += 1
                else:
                    tokens += self._verify(r, logits[b], position, drafts, q, hidden[b])
            self.stats.decode_tokens_per_s = tokens / (time.perf_counter() - start)
            self.stats.decode_steps += 1

    def _draft(self, r: _Running) -> tuple[int, int, list[int], torch.Tensor | None]:
        """(last token, its position, drafts, draft probabilities) of one sequence's next step."""
        seq = r.seq
        tokens = seq.prompt_ids + seq.output_ids
        state = seq.speculation
        drafts, q = [], None
        if state is not None and r.hidden is not None and not r.request.cancelled:
            k = min(state.k.k, self._draft_room, seq.params.max_tokens - len(seq.output_ids) - 1)
            ctx = spec.DraftContext(tokens, len(tokens) - 1, r.hidden, self.model.decoder, self._cache, r.row,
                                    seq.params)
            drafts, q = spec.propose(self.drafter, ctx, k)
        return tokens[-1], len(tokens) - 1, drafts, q

    def _verify(self, r: _Running, logits: torch.Tensor, position: int, drafts: list[int], q, hidden) -> int:
        """Accept a sequence's drafts against the target's logits [n + 1, V]; returns the tokens emitted."""
        seq = r.seq
        if r.request.cancelled:
            return 0
        new = spec.accept(logits, drafts, q, seq.params, seq.output_ids, seq.generator)
        seq.speculation.record(len(drafts), len(new) - 1)
        self.stats.draft_tokens += len(drafts)
        self.stats.accepted_tokens += len(new) - 1
        row = r.row
        for i, token in enumerate(new):
            self._emit_token(r, token, logits[i])
            if seq.finished:
                return i + 1
        if len(new) <= len(drafts):  # some rejected: forget them (the last new token is not in the cache yet)
            self._cache.truncate(row, position + len(new))
        r.hidden = hidden[len(new) - 1]
        return len(new)

    def _prefill_chunk(self, r: _Running) -> None:
        decoder = self.model.decoder
        prompt = r.seq.prompt_ids
        start, joined = r.prefilled, None
        if r.seq.soft:
            if r.soft_embeds is None:
                embeds, mask = soft_embeds([(len(prompt), r.seq.soft)], len(prompt), decoder.config.hidden_size,
                                           decoder.dtype, decoder.device)
                r.soft_embeds = embeds, mask, joined_columns(mask)
            joined = r.soft_embeds[2]
        if self.prefix_store is not None and start == r.reused:  # its first chunk
            points = resume_points(len(prompt), self.prefill_chunk, joined, 2)
            if points and self.prefix_store.wants(points[-1]):
                r.resume_at = [c for c in points if c > r.reused]
                if r.reused and r.resume_at:  # its entry resumes where it did too: the shared document's end
                    r.rings_at = (r.reused, self._cache.ring_snapshot(r.row, r.reused))
                    r.resume_at = r.resume_at[-1:]
        end = chunk_end(start, len(prompt), self.prefill_chunk, joined)
        soft = {}
        if r.soft_embeds is not None:
            soft = dict(embeds=r.soft_embeds[0][:, start:end], embeds_mask=r.soft_embeds[1][:, start:end])
        ids = torch.tensor([prompt[start:end]], dtype=torch.long, device=decoder.device)
        pos = torch.arange(start, end, device=decoder.device)[None]
        hidden = decoder(ids, pos, self._cache.view([r.row]), **soft)
        r.prefilled = end
        if r.resume_at and end == r.resume_at[-1]:
            self._remember(r, r.key[:end], r.rings_at)
        elif r.resume_at and end == r.resume_at[0]:  # only the rings: the last point's snapshot holds the rest
            r.rings_at = (end, self._cache.ring_snapshot(r.row, end))
        if r.decoding:
            r.hidden = hidden[0, -1]
            self._sample(r, decoder.logits(hidden[:, -1])[0])

    def _sample(self, r: _Running, logits: torch.Tensor) -> None:
        seq, request = r.seq, r.request
        if r.request.cancelled:
            return
        params = seq.params
        raw = logits
        logits = apply_penalties(logits, seq.output_ids, params)
        if request.constraint is not None:
            logits = request.constraint.mask_logits(logits)
        self._emit_token(r, sample(logits, params, seq.generator), raw)

    def _emit_token(self, r: _Running, token: int, raw: torch.Tensor) -> None:
        """Record a chosen token (raw: the model's logits it came from, for logprobs), emit it, and retire
        the sequence when it is finished."""
        seq, request = r.seq, r.request
        logprob = _logprob(raw, token, request.logprobs) if request.logprobs is not None else None
        if request.constraint is not None:
            request.constraint.accept(token)
        text = seq.append(token)
        if not seq.finished and request.constraint is not None and request.constraint.done:
            text += seq.finish("stop")
        out = RequestOutput(token, text, seq.finished, seq.finish_reason, len(seq.prompt_ids),
                            len(seq.output_ids), logprob, r.reused)
        if seq.finished:
            with self._lock:
                self._retire(r)
        request.emit(out)


def _logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """The model's own log-probabilities (before temperature and filtering), as OpenAI reports them."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    best = torch.topk(logp, top) if top > 0 else None
    pairs = list(zip(best.indices.tolist(), best.values.tolist())) if best is not None else []
    return TokenLogprob(token, float(logp[token]), pairs)
