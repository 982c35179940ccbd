"""The engine: one step loop that the Python API, the CLI and the server all drive.

Each step admits waiting requests into free cache rows (scheduler.py), runs one prefill chunk of the oldest
request still prefilling (so a long prompt never stalls the others for longer than a chunk), then one
decode step over every sequence that is generating (runner.py). Each sequence keeps its own sampling state
(generator, penalties, grammar constraint, stop conditions, thinking budget) and gets its outputs through its
request's `emit` callback. A spent thinking budget forces the tokens closing the thought channel in place of
sampled ones, on the one path every step takes (_sample, or _verify's accepted tokens).

Speculative decoding (a request's speculative=K and drafter): each generating sequence drafts on its own
(its own adaptive K; none under a grammar), the decode step's forward verifies every row's drafts together
(speculative/verify.py), and each row is rolled back past its rejected drafts.

Who steps it: `step()` / `generate()` on the caller's thread (the Python API, the CLI), or `start()`'s
background thread (the server), never both.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Iterable, Iterator

import torch

from ..kv import PrefixStore
from ..sampling import ThinkingBudget, apply_penalties, sample
from ..speculative import verify as spec
from .runner import PREFILL_CHUNK, Runner
from .scheduler import Running, Scheduler, Stats
from .sequence import Request, RequestOutput, Sequence, token_logprob


class Engine:
    def __init__(self, model, max_batch: int = 8, max_queue: int = 64, prefill_chunk: int = PREFILL_CHUNK,
                 prefix_store: PrefixStore | None = None, ring_tail: int = 0,
                 kv_budget: int | None = None, kv_dtype: str = "float", speculative: int = 0, drafter=None):
        """model: an api.Model (decoder, tokenizer, eos_token_ids). prefix_store: reuse of shared prefixes
        (None: off). ring_tail: extra sliding-ring slots (at least what speculation rolls back).
        kv_budget: bytes of KV shared by all rows (None: unbounded). kv_dtype: "float" or "int8".
        speculative: tokens drafted per step at most for a request that does not say (0: off); drafter: a
        speculative Drafter (e.g. speculative.PromptLookup()), needed with speculative."""
        self.model = model
        self.speculative = spec.check_k(speculative)
        if self.speculative and drafter is None:
            raise ValueError("speculative: a drafter is needed (e.g. gemma4.speculative.PromptLookup())")
        self.drafter = drafter
        ring_tail = max(ring_tail, self.speculative)  # a verify step rolls the rings back that far
        cache = model.decoder.new_cache(batch=max_batch, capacity=256, tail=ring_tail, kv_dtype=kv_dtype)
        self.stats = Stats()
        self.scheduler = Scheduler(cache, max_batch, max_queue, prefix_store, kv_budget, self.stats,
                                   on_retire=self._release)
        self.runner = Runner(model.decoder, cache, prefill_chunk)
        self._draft_room = spec.draft_room(cache)
        self._stop = False
        self._thread: threading.Thread | None = None
        self._stepping = threading.Lock()  # one step at a time, whichever threads drive the engine
        self.error: BaseException | None = None

    # ---- what callers read --------------------------------------------------------------------
    @property
    def max_batch(self) -> int:
        return self.scheduler.max_batch

    @property
    def max_queue(self) -> int:
        return self.scheduler.max_queue

    @property
    def prefill_chunk(self) -> int:
        return self.runner.prefill_chunk

    @property
    def prefix_store(self) -> PrefixStore | None:
        return self.scheduler.prefix_store

    @property
    def budget(self):
        return self.scheduler.budget

    @property
    def cache(self):
        return self.runner.cache

    @property
    def queue_depth(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def running(self) -> int:
        return len(self.scheduler.running)

    # ---- requests (any thread) ----------------------------------------------------------------
    def submit(self, request: Request, bounded: bool = True) -> None:
        """Queue a request (QueueFull, TooLarge: see scheduler.Scheduler.submit)."""
        k = self._k(request)
        spec.check_k(k)
        if k and self._drafter(request) is None:
            raise ValueError("speculative: a drafter is needed (e.g. gemma4.speculative.PromptLookup())")
        self.scheduler.submit(request, bounded)

    def cancel(self, request: Request) -> None:
        self.scheduler.cancel(request)

    def _k(self, request: Request) -> int:
        return self.speculative if request.speculative is None else request.speculative

    def _drafter(self, request: Request):
        return request.drafter if request.drafter is not None else self.drafter

    # ---- the background thread (the server) ---------------------------------------------------
    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="gemma4-engine", daemon=True)
        self._thread.start()
        return self

    def run_here(self) -> None:
        """The step loop on the calling thread until stop() (from another thread). The server steps on the thread
        that loaded the model: with OpenMP (libgomp) on few CPUs, a second thread's parallel regions run markedly
        slower while the loading thread's team lives (its workers are woken instead of spinning)."""
        self._thread = None
        self._loop()

    def stop(self) -> None:
        with self.scheduler.lock:
            self._stop = True
            self.scheduler.lock.notify()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                while self._next():
                    with self._stepping:
                        self._step()
        except BaseException as e:  # the model failed: every request gets an answer, not a hang
            self.error = e
            self._fail()
            raise

    def _next(self) -> bool:
        """Wait until there is work; admit waiting requests into free rows. False: shut down."""
        s = self.scheduler
        with s.lock:
            while not self._stop and not s.running and not s.waiting:
                s.lock.wait()
            if self._stop:
                return False
            self._admit()
            return True

    # ---- stepping on the caller's thread (the Python API, the CLI) ----------------------------
    def step(self) -> bool:
        """One iteration on the caller's thread, for an engine whose thread is not started: admit waiting
        requests, run one prefill chunk and one decode step. False when there was nothing to do."""
        if self._thread is not None:
            raise RuntimeError("Engine.step: the engine's own thread is running")
        try:
            with torch.inference_mode(), self._stepping:
                with self.scheduler.lock:
                    self._admit()
                    if not self.scheduler.running:
                        return False
                self._step()
                return True
        except BaseException:  # every request gets its last output and its row back; the caller sees why
            self._fail()
            raise

    def generate(self, requests: Iterable[Request]) -> Iterator[tuple[int, RequestOutput]]:
        """Run requests to their end on the caller's thread: yields (index of the request, output) as the
        steps produce them. Closing the iterator early cancels the requests still running."""
        requests = list(requests)
        outputs: collections.deque = collections.deque()
        for i, request in enumerate(requests):
            request.emit = _collect(outputs, i, request.emit)
        open_ = len(requests)
        try:
            for request in requests:
                self.submit(request, bounded=False)
            while open_:
                if not self.step() and not outputs:
                    raise RuntimeError("Engine.generate: requests are waiting but none can be admitted")
                while outputs:
                    i, out = outputs.popleft()
                    open_ -= out.finished
                    yield i, out
        finally:
            if open_:
                for request in requests:
                    self.cancel(request)
                with self.scheduler.lock:
                    self._admit()  # retires the cancelled rows now

    def _fail(self) -> None:
        for request in self.scheduler.fail_all():
            request.emit(RequestOutput(None, "", True, "error", len(request.prompt_ids), 0))

    # ---- one step -----------------------------------------------------------------------------
    def _admit(self) -> None:
        tok = self.model.tokenizer
        eos = self.model.eos_token_ids

        thought = getattr(self.model, "thought_tokens", None)  # (open id, closing ids), None: no channel

        def sequence(request: Request) -> Sequence:
            budget = request.params.thinking_budget
            thinking = None if budget is None or thought is None else \
                ThinkingBudget(budget, thought[0], thought[1], request.prompt_ids)
            return Sequence(request.prompt_ids, request.params, eos, tok.stream() if tok is not None else None,
                            soft=request.soft, thinking=thinking)

        for r in self.scheduler.admit(sequence):
            if self._k(r.request) and r.request.constraint is None:
                r.seq.speculation = spec.Speculation(spec.AdaptiveK(self._k(r.request)))

    def _release(self, r: Running) -> None:
        drafter = self._drafter(r.request)
        if drafter is not None:
            spec.release(drafter, r.row)

    def _step(self) -> None:
        r = self.scheduler.next_prefill()
        if r is not None:
            self._prefill_chunk(r)
        decoding = self.scheduler.decoding()
        if decoding:
            start = time.perf_counter()
            plans = [self._draft(r) for r in decoding]
            hidden, logits = self.runner.step([r.row for r in decoding], [p[:3] for p in plans])
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

    def _prefill_chunk(self, r: Running) -> None:
        runner, request = self.runner, r.request
        prompt = r.seq.prompt_ids
        if request.prompt_cache is not None:  # the whole prompt at once, through the file
            hidden = runner.prefill_from(request.prompt_cache, r.row, prompt, r.seq.params.max_tokens, r.seq.soft,
                                         request.progress)
            r.reused = request.prompt_cache.reused
            r.prefilled = len(prompt)
            r.hidden = hidden
            self._sample(r, runner.logits(hidden))
            return
        start, joined = r.prefilled, None
        if r.seq.soft:
            if r.soft_embeds is None:
                r.soft_embeds = runner.soft_embeds(len(prompt), r.seq.soft)
            joined = r.soft_embeds[2]
        if start == r.reused:  # its first chunk
            self.scheduler.plan_resume(r, runner.resume_points(len(prompt), joined, 2))
        end = runner.chunk_end(start, len(prompt), joined)
        hidden = runner.prefill(r.row, prompt, start, end, r.soft_embeds)
        self.scheduler.prefilled_to(r, end)
        if request.progress is not None:
            request.progress(end, len(prompt))
        if r.decoding:
            r.hidden = hidden[-1]
            self._sample(r, runner.logits(hidden[-1]))

    def _draft(self, r: Running) -> tuple[int, int, list[int], torch.Tensor | None]:
        """(last token, its position, drafts, draft probabilities) of one sequence's next step."""
        seq = r.seq
        last = len(seq.prompt_ids) + len(seq.output_ids) - 1
        state = seq.speculation
        if state is None or r.hidden is None or r.request.cancelled:  # no copy of the whole context per step
            return (seq.output_ids or seq.prompt_ids)[-1], last, [], None
        tokens = seq.prompt_ids + seq.output_ids
        k = min(state.k.k, self._draft_room, seq.params.max_tokens - len(seq.output_ids) - 1)
        ctx = spec.DraftContext(tokens, last, r.hidden, self.model.decoder, self.runner.cache, r.row, seq.params)
        drafts, q = spec.propose(self._drafter(r.request), ctx, k)
        return tokens[-1], last, drafts, q

    def _verify(self, r: Running, logits: torch.Tensor, position: int, drafts: list[int], q, hidden) -> int:
        """Accept a sequence's drafts against the target's logits [n + 1, V]; returns the tokens emitted."""
        seq = r.seq
        if r.request.cancelled:
            return 0
        new = spec.accept(logits, drafts, q, seq.params, seq.output_ids, seq.generator)
        override = seq.thinking.first_override(new) if seq.thinking is not None else None
        if override is not None:  # the budget ran out within the accepted tokens: the close replaces the rest
            i, forced = override
            new = new[:i] + [forced]
        seq.speculation.record(len(drafts), len(new) - 1)
        self.stats.draft_tokens += len(drafts)
        self.stats.accepted_tokens += len(new) - 1
        for i, token in enumerate(new):
            self._emit_token(r, token, logits[i])
            if seq.finished:
                return i + 1
        if len(new) <= len(drafts):  # some rejected: forget them (the last new token is not in the cache yet)
            self.runner.cache.truncate(r.row, position + len(new))
        r.hidden = hidden[len(new) - 1]
        return len(new)

    def _sample(self, r: Running, logits: torch.Tensor) -> None:
        seq, request = r.seq, r.request
        if request.cancelled:
            return
        forced = seq.forced_token()
        if forced is not None:
            self._emit_token(r, forced, logits)
            return
        raw = logits
        logits = apply_penalties(logits, seq.output_ids, seq.params)
        if request.constraint is not None:
            logits = request.constraint.mask_logits(logits)
        self._emit_token(r, sample(logits, seq.params, seq.generator), raw)

    def _emit_token(self, r: Running, token: int, raw: torch.Tensor) -> None:
        """Record a chosen token (raw: the model's logits it came from, for logprobs), emit it, and retire
        the sequence when it is finished."""
        seq, request = r.seq, r.request
        logprob = token_logprob(raw, token, request.logprobs) if request.logprobs is not None else None
        if request.constraint is not None:
            request.constraint.accept(token)
        text = seq.append(token)
        if not seq.finished and request.constraint is not None and request.constraint.done:
            text += seq.finish("stop")
        state = seq.speculation
        out = RequestOutput(token, text, seq.finished, seq.finish_reason, len(seq.prompt_ids),
                            len(seq.output_ids), logprob, r.reused, *((state.drafted, state.accepted) if state else ()))
        if seq.finished:
            with self.scheduler.lock:
                self.scheduler.retire(r)
        request.emit(out)


def _collect(outputs: collections.deque, index: int, also):
    def emit(out: RequestOutput) -> None:
        outputs.append((index, out))
        also(out)

    return emit
