"""Requests and the step loop: chunked prefill, then decode steps over a batch of sequences.

A Sequence holds one request's state: its ids, sampling parameters and generator, its detokenizer
and its stop conditions. The loop prefills every prompt of the batch (left padded, in chunks) and
then decodes one token per running sequence per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from . import speculative as spec
from .model.decoder import Decoder
from .sampling import SamplingParams, apply_penalties, sample

PREFILL_CHUNK = 512


@dataclass
class StepOutput:
    """What one sequence produced in one step: its new token and the text now safe to show."""

    index: int
    token_id: int
    text: str
    finished: bool
    finish_reason: str | None


@dataclass
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    eos_ids: set[int] = field(default_factory=set)
    detokenizer: object | None = None  # has push(id) -> str and flush() -> str
    # soft tokens (images): (offset in the prompt, [n, hidden] embeddings replacing prompt_ids[offset:offset+n])
    soft: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    _shown: int = 0

    def __post_init__(self):
        self.speculation: spec.Speculation | None = None  # set by a speculative generate()
        if not self.prompt_ids:
            raise ValueError("empty prompt: at least one token is needed")
        if self.params.stop and self.detokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        self.generator = None if self.params.greedy else self.params.make_generator()
        self._holdback = max((len(s) for s in self.params.stop), default=1) - 1

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token: int) -> str:
        """Record a sampled token; returns the new text that can be shown."""
        self.output_ids.append(token)
        if (token in self.eos_ids and not self.params.ignore_eos) or token in self.params.stop_token_ids:
            self.finish_reason = "stop"  # the stop token itself is not shown
        elif self.detokenizer is not None:
            searched_from = max(0, len(self.text) - self._holdback)
            self.text += self.detokenizer.push(token)
            hits = [at for at in (self.text.find(s, searched_from) for s in self.params.stop) if at >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.finish_reason = "stop"
                self.detokenizer = None  # nothing after a stop string is shown
        if not self.finished and len(self.output_ids) >= self.params.max_tokens:
            self.finish_reason = "length"
        if self.finished and self.detokenizer is not None:
            self.text += self.detokenizer.flush()
        end = len(self.text) if self.finished else max(self._shown, len(self.text) - self._holdback)
        new, self._shown = self.text[self._shown:end], end
        return new

    def finish(self, reason: str) -> str:
        """End the sequence now (e.g. its grammar is complete); returns the text still held back."""
        self.finish_reason = reason
        if self.detokenizer is not None:
            self.text += self.detokenizer.flush()
            self.detokenizer = None
        new, self._shown = self.text[self._shown:], len(self.text)
        return new


def _left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    pos = torch.full((len(prompts), longest), -1, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, longest - len(p):] = torch.tensor(p, dtype=torch.long)
        pos[b, longest - len(p):] = torch.arange(len(p))
    return ids.to(device), pos.to(device)


def joined_columns(embeds_mask: torch.Tensor | None) -> list[bool] | None:
    """joined[i]: columns i and i+1 hold soft tokens of one run (an image), which a chunk must not split."""
    return None if embeds_mask is None else (embeds_mask[:, 1:] & embeds_mask[:, :-1]).any(0).tolist()


def chunk_end(start: int, length: int, chunk: int, joined: list[bool] | None) -> int:
    """End of the chunk from `start`: the next multiple of `chunk` (at most `length`), stretched so that
    no image run is cut, or the end of the first image run that ends before it.

    Chunks end on a grid of absolute positions and at image ends, whatever the first chunk's start, so a
    prefill resumed at one of those ends (prefix reuse, prompt caches) computes every later position in
    the same chunk, beside the same rows, as a prefill from position 0 does: the same bits, not just the
    same values up to rounding (a product's rows are summed differently at other row counts)."""
    end = min((start // chunk + 1) * chunk, length)
    if joined is None:
        return end
    while end < length and joined[end - 1]:
        end += 1
    for e in range(start + 2, end):  # an image run's last column is e - 1
        if joined[e - 2] and not joined[e - 1]:
            return e
    return end


def resume_points(length: int, chunk: int, joined: list[bool] | None, most: int | None = 1) -> list[int]:
    """The last `most` (None: all) chunk ends (grid points and image ends, see chunk_end) a prefill of
    `length` columns passes before its last column, in order: where its KV is worth keeping for reuse. A later
    prompt sharing the columns before one resumes there and computes the rest exactly as a fresh prefill
    would; the last column is always computed (its logits choose the first output token)."""
    points = [end for _, end in _chunks(length, chunk, joined) if end <= length - 1]
    return points if most is None else points[-most:] if most > 0 else []


def _chunks(length: int, chunk: int, joined: list[bool] | None, start: int = 0) -> Iterator[tuple[int, int]]:
    while start < length:
        end = chunk_end(start, length, chunk, joined)
        yield start, end
        start = end


@torch.inference_mode()
def prefill(decoder: Decoder, cache, ids: torch.Tensor, pos: torch.Tensor, chunk: int = PREFILL_CHUNK,
            on_hidden: Callable[[int, torch.Tensor], None] | None = None,
            embeds: torch.Tensor | None = None, embeds_mask: torch.Tensor | None = None,
            progress: Callable[[int, int], None] | None = None, start: int = 0) -> torch.Tensor:
    """Run [B, T] ids through the model in chunks of columns (see chunk_end); returns the last column's
    hidden state. `start`: columns before it are already in the cache (a resumed prefill).
    `on_hidden(start, hidden)` sees every chunk's hidden states (forward() collects logits with it);
    `progress(done, total)` is told the columns done after each chunk.
    embeds / embeds_mask: soft-token embeddings and where they go (see Decoder.forward)."""
    if chunk < 1:
        raise ValueError(f"prefill chunk: must be at least 1, got {chunk}")
    total = ids.shape[1]
    if not 0 <= start < total:
        raise ValueError(f"prefill: start {start} outside the {total} columns")
    hidden = None
    for a, b in _chunks(total, chunk, joined_columns(embeds_mask), start):
        soft = {} if embeds_mask is None else dict(embeds=embeds[:, a:b], embeds_mask=embeds_mask[:, a:b])
        hidden = decoder(ids[:, a:b], pos[:, a:b], cache, **soft)
        if on_hidden is not None:
            on_hidden(a, hidden)
        if progress is not None:
            progress(b, total)
    return hidden[:, -1]


def soft_embeds(rows: list[tuple[int, list[tuple[int, torch.Tensor]]]], width: int, hidden: int, dtype, device
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Dense [B, width, hidden] embeddings and their [B, width] mask for left-padded rows of `width`
    columns, from each row's (prompt length, [(offset, embeddings)]); (None, None) when there are none."""
    if not any(spans for _, spans in rows):
        return None, None
    embeds = torch.zeros(len(rows), width, hidden, dtype=dtype, device=device)
    mask = torch.zeros(len(rows), width, dtype=torch.bool, device=device)
    for b, (length, spans) in enumerate(rows):
        for offset, values in spans:
            at = width - length + offset
            embeds[b, at:at + values.shape[0]] = values.to(device=device, dtype=dtype)
            mask[b, at:at + values.shape[0]] = True
    return embeds, mask


@torch.inference_mode()
def generate(decoder: Decoder, sequences: list[Sequence], pad_id: int = 0, chunk: int = PREFILL_CHUNK,
             progress: Callable[[int, int], None] | None = None,
             prompt_cache=None, speculative: int = 0, drafter=None) -> Iterator[list[StepOutput]]:
    """Yields, per step, the outputs of the sequences still running at that step (with speculation, a
    sequence may give several tokens in one step).
    progress(done, total): prompt columns prefilled. prompt_cache (one sequence only): has
    prefill(decoder, ids, capacity, chunk, progress, soft) -> (cache, last hidden), e.g. a PromptCache.
    speculative: tokens drafted per step at most (0: off); drafter: a speculative.Drafter (default:
    prompt lookup)."""
    spec.check_k(speculative)
    device = decoder.device
    ids, pos = _left_pad([s.prompt_ids for s in sequences], pad_id, device)
    capacity = ids.shape[1] + max(s.params.max_tokens for s in sequences)
    embeds, embeds_mask = soft_embeds([(len(s.prompt_ids), s.soft) for s in sequences], ids.shape[1],
                                      decoder.config.hidden_size, decoder.dtype, device)
    if prompt_cache is not None:
        if len(sequences) != 1:
            raise ValueError("a prompt cache serves one prompt at a time")
        cache, last_hidden = prompt_cache.prefill(decoder, sequences[0].prompt_ids, capacity, chunk, progress,
                                                  soft=sequences[0].soft, tail=speculative)
    else:
        # a verify step may roll the rings back by `speculative` positions: they need as many spare slots
        cache = decoder.new_cache(batch=len(sequences), capacity=capacity, tail=speculative)
        last_hidden = prefill(decoder, cache, ids, pos, chunk, embeds=embeds, embeds_mask=embeds_mask,
                              progress=progress)
    if speculative:
        yield from _speculative_decode(decoder, sequences, cache, last_hidden, speculative,
                                       drafter if drafter is not None else spec.PromptLookup(), pad_id)
        return
    next_pos = pos[:, -1] + 1
    while True:
        logits = decoder.logits(last_hidden)
        step = []
        for b, seq in enumerate(sequences):
            if seq.finished:
                continue
            token = sample(apply_penalties(logits[b], seq.output_ids, seq.params), seq.params, seq.generator)
            text = seq.append(token)
            step.append(StepOutput(b, token, text, seq.finished, seq.finish_reason))
        yield step
        if all(s.finished for s in sequences):
            return
        # Finished rows keep stepping on their last token; their outputs are ignored.
        tokens = torch.tensor([[s.output_ids[-1]] for s in sequences], dtype=torch.long, device=device)
        last_hidden = decoder(tokens, next_pos[:, None], cache)[:, -1]
        next_pos = next_pos + 1


def _speculative_decode(decoder: Decoder, sequences: list[Sequence], cache, last_hidden: torch.Tensor, k_max: int,
                        drafter, pad_id: int) -> Iterator[list[StepOutput]]:
    """The decode loop of generate() with drafting: each running sequence drafts on its own, then one
    target forward over every row's [last token, drafts] (right padded) verifies them all."""
    room = spec.draft_room(cache)
    logits = decoder.logits(last_hidden)
    step = []
    for b, seq in enumerate(sequences):
        seq.speculation = spec.Speculation(spec.AdaptiveK(k_max), hidden=last_hidden[b])
        token = sample(apply_penalties(logits[b], seq.output_ids, seq.params), seq.params, seq.generator)
        step.append(StepOutput(b, token, seq.append(token), seq.finished, seq.finish_reason))
    try:
        while True:
            yield step
            if all(s.finished for s in sequences):
                return
            plans: list[tuple[int, int, list[int]] | None] = []
            qs = []
            for b, seq in enumerate(sequences):
                if seq.finished:
                    plans.append(None)
                    qs.append(None)
                    continue
                tokens = seq.prompt_ids + seq.output_ids
                state = seq.speculation
                k = min(state.k.k, room, seq.params.max_tokens - len(seq.output_ids) - 1)
                ctx = spec.DraftContext(tokens, len(tokens) - 1, state.hidden, decoder, cache, b, seq.params)
                drafts, q = spec.propose(drafter, ctx, k)
                plans.append((tokens[-1], len(tokens) - 1, drafts))
                qs.append(q)
            ids, pos = spec.verify_batch(plans, pad_id, decoder.device)
            hidden = decoder(ids, pos, cache)
            all_logits = spec.verify_logits(decoder, hidden, pos)
            step = []
            for b, (seq, plan, q) in enumerate(zip(sequences, plans, qs)):
                if plan is None:
                    continue
                _, position, drafts = plan
                new = spec.accept(all_logits[b], drafts, q, seq.params, seq.output_ids, seq.generator)
                seq.speculation.record(len(drafts), len(new) - 1)
                for token in new:
                    step.append(StepOutput(b, token, seq.append(token), seq.finished, seq.finish_reason))
                    if seq.finished:
                        break
                if len(new) <= len(drafts):  # some rejected: forget them (the last new token is not in the cache yet)
                    cache.truncate(b, position + len(new))
                seq.speculation.hidden = hidden[b, len(new) - 1]
    finally:
        for b in range(len(sequences)):
            spec.release(drafter, b)
