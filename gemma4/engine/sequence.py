"""Requests, their state and their outputs.

A Request is what a caller hands the engine: prompt ids (and image soft tokens), sampling parameters, the
options that change how it runs (logprobs, a grammar constraint, speculation) and an `emit` callback that
receives its RequestOutputs. A Sequence holds one request's generation state: its output ids, its sampling
generator, its detokenizer, its stop conditions and its thinking budget.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..sampling import SamplingParams, ThinkingBudget


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
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix store (or a prompt-cache file)
    drafted_tokens: int = 0  # speculative decoding so far: tokens drafted, and those the target kept
    accepted_tokens: int = 0


@dataclass
class StepOutput:
    """What one sequence of a Python-API batch produced: its new token and the text now safe to show."""

    index: int
    token_id: int
    text: str
    finished: bool
    finish_reason: str | None
    logprob: TokenLogprob | None = None


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[RequestOutput], None] = lambda out: None
    logprobs: int | None = None  # None: none; k: the chosen token's logprob and the k most likely
    constraint: object | None = None  # has mask_logits(logits), accept(token), done
    soft: list = field(default_factory=list)  # image soft tokens: (offset in prompt_ids, [n, hidden] embeddings)
    speculative: int | None = None  # tokens drafted per step at most (None: the engine's setting)
    drafter: object | None = None  # a speculative drafter (None: the engine's)
    prompt_cache: object | None = None  # has prefill(decoder, ids, capacity, chunk, progress, soft, tail), reused
    progress: Callable[[int, int], None] | None = None  # (prompt tokens prefilled, prompt tokens)
    id: int = field(default_factory=itertools.count().__next__)
    cancelled: bool = False


@dataclass
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    eos_ids: set[int] = field(default_factory=set)
    detokenizer: object | None = None  # has push(id) -> str and flush() -> str
    # soft tokens (images): (offset in the prompt, [n, hidden] embeddings replacing prompt_ids[offset:offset+n])
    soft: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    thinking: ThinkingBudget | None = None  # params.thinking_budget at work, where the model has a thought channel
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    _shown: int = 0

    def __post_init__(self):
        self.speculation = None  # a speculative.verify.Speculation when this sequence drafts
        if not self.prompt_ids:
            raise ValueError("empty prompt: at least one token is needed")
        if self.params.stop and self.detokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        self.generator = None if self.params.greedy else self.params.make_generator()
        self._holdback = max((len(s) for s in self.params.stop), default=1) - 1

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def forced_token(self) -> int | None:
        """The token the next step must produce instead of sampling (a thinking budget spent), or None."""
        return self.thinking.forced() if self.thinking is not None else None

    def append(self, token: int) -> str:
        """Record a sampled token; returns the new text that can be shown."""
        self.output_ids.append(token)
        if self.thinking is not None:
            self.thinking.advance(token)
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


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """The model's own log-probabilities (before temperature and filtering), as OpenAI reports them."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    best = torch.topk(logp, top) if top > 0 else None
    pairs = list(zip(best.indices.tolist(), best.values.tolist())) if best is not None else []
    return TokenLogprob(token, float(logp[token]), pairs)
