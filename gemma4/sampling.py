"""Sampling parameters, logits processors and the sampler."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """Defaults are the Gemma team's recommended sampling settings. temperature 0 is greedy."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 64
    top_p: float = 0.95
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence in the generated text
    thinking_budget: int | None = None  # tokens inside a thought channel before it is closed (None: unbounded)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None and (type(self.seed) is not int or not 0 <= self.seed < 2**64):
            raise ValueError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")
        if self.thinking_budget is not None and (type(self.thinking_budget) is not int or self.thinking_budget < 0):
            raise ValueError(f"thinking_budget must be an integer >= 0 (or None: unbounded), got {self.thinking_budget!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def make_generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        seed = self.seed if self.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        return torch.Generator(device=device).manual_seed(seed)


def apply_penalties(logits: torch.Tensor, output_ids: list[int], params: SamplingParams) -> torch.Tensor:
    """logits - presence * [token seen] - frequency * count(token), over the tokens generated so far."""
    if not output_ids or (params.presence_penalty == 0 and params.frequency_penalty == 0):
        return logits
    counts = torch.bincount(torch.tensor(output_ids, device=logits.device), minlength=logits.shape[-1])
    counts = counts[:logits.shape[-1]].to(logits.dtype)
    return logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(logits.dtype)


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p filtering (removed tokens get -inf). logits: [V] float32."""
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens before it already reach top_p; the first always stays.
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if params.min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


def distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The float32 probabilities [V] that sample() draws from: one-hot on the argmax when greedy."""
    if params.greedy:
        return torch.nn.functional.one_hot(torch.argmax(logits), logits.shape[-1]).float()
    return torch.softmax(process_logits(logits.float(), params), dim=-1)


def greedy_token(logits: torch.Tensor) -> int:
    """The index of the largest of logits [V], as torch.argmax gives it (the first of equal ones; the first NaN
    where there is one). On the CPU through numpy, whose vectorised reduction takes ~1/10 of torch.argmax's
    time over a 262K vocabulary (several ms of every 8-row decode step)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 1 \
            and not logits.requires_grad:
        return int(logits.numpy().argmax())
    return int(torch.argmax(logits))


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from float32 logits [V]."""
    if params.greedy:
        return greedy_token(logits)
    return int(torch.multinomial(distribution(logits, params), 1, generator=generator))


class ThinkingBudget:
    """One sequence's thought channel under a token budget (SamplingParams.thinking_budget).

    It counts the tokens generated after the channel opens (its `thought` header included); once
    `budget` of them are spent, the tokens that close the channel (`close_ids`, as the chat template
    writes the close: a newline, then `<channel|>`) are forced one per step instead of sampled, and the
    answer follows as usual. The prompt decides where it starts: inside the channel when the prompt's
    last channel token opens one."""

    def __init__(self, budget: int, open_id: int, close_ids: list[int], prompt_ids: list[int]):
        self.budget, self.open_id, self.close_ids = budget, open_id, list(close_ids)
        last_open = max((i for i, t in enumerate(prompt_ids) if t == open_id), default=-1)
        last_close = max((i for i, t in enumerate(prompt_ids) if t == self.close_ids[-1]), default=-1)
        self.inside = last_open > last_close
        self.spent = 0  # tokens sampled inside the open channel
        self._closing = 0  # close_ids already forced

    def forced(self) -> int | None:
        """The token the next step must produce, or None: sample as usual."""
        if self.inside and self.spent >= self.budget:
            return self.close_ids[self._closing]
        return None

    def advance(self, token: int) -> None:
        """Record the token the sequence produced."""
        if not self.inside:
            if token == self.open_id:
                self.inside, self.spent, self._closing = True, 0, 0
        elif token == self.close_ids[-1]:
            self.inside, self._closing = False, 0
        elif self.spent >= self.budget:
            self._closing += 1
        else:
            self.spent += 1  # an open token inside the channel too: it does not start the count again

    def first_override(self, tokens: list[int]) -> tuple[int, int] | None:
        """(i, forced token) for the first of `tokens` (produced one after another from now) that the
        budget replaces, or None when it replaces none of them; the state itself does not change."""
        state = copy.copy(self)
        for i, token in enumerate(tokens):
            forced = state.forced()
            if forced is not None and forced != token:
                return i, forced
            state.advance(token)
        return None
