"""Speculative verification: a drafter proposes k tokens, one target forward over k+1 positions checks them.

A step feeds the target [tokens[-1], d1 .. dk] at their positions. Greedy: the drafts agreeing with
the target's argmax are kept, plus the target's own next token. Sampling: the standard rule (Leviathan
et al., Chen et al.): draft d_i is kept with probability min(1, p(d_i) / q(d_i)); at the first rejection
the token is drawn from norm(max(p - q, 0)); after k acceptances one more from p. p is the target's
distribution after the request's own transforms (sampling.distribution, the one sample() draws from),
so the output distribution is exactly plain decoding's. The cache row is then rolled back past the
rejected positions (KVCache.truncate).

This module sits below the engine (which imports it); the drafters (drafters.py) sit above it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from ..sampling import SamplingParams, apply_penalties, distribution, greedy_token

if TYPE_CHECKING:
    from ..kv import KVCache
    from ..model.decoder import Decoder

MAX_DRAFT = 16  # tokens one step may draft at most (--speculative above this is refused)


@dataclass
class DraftContext:
    tokens: list[int]  # prompt + output so far; tokens[-1] is sampled but NOT yet in the target's cache
    position: int  # position of tokens[-1]
    hidden: torch.Tensor  # [hidden_size]: the target's Decoder.forward output (after the final norm) at
    # position - 1, i.e. the state whose logits produced tokens[-1]
    decoder: "Decoder"  # the target
    cache: "KVCache"  # the target's cache; row `row` holds positions < position
    row: int
    params: SamplingParams | None = None  # the request's sampling (a drafter may ignore it)


class Drafter(Protocol):
    def propose(self, ctx: DraftContext, k: int) -> tuple[list[int], torch.Tensor | None]:
        """Up to k tokens to follow ctx.tokens, and their draft probabilities as float32 rows [n, vocab]
        (None: the drafts are deterministic — greedy or copied — i.e. one-hot)."""
        ...

    # Optional: release(row) — the sequence in `row` has ended (the engine calls it when present).


def release(drafter, row: int) -> None:
    """Tell a drafter that the sequence in `row` has ended, if it keeps state per row."""
    done = getattr(drafter, "release", None)
    if done is not None:
        done(row)


def check_k(k: int) -> int:
    if not isinstance(k, int) or not 0 <= k <= MAX_DRAFT:
        raise ValueError(f"speculative: draft tokens per step must be an integer in 0..{MAX_DRAFT}, got {k!r}")
    return k


# ---- the step -------------------------------------------------------------------------------------
class AdaptiveK:
    """How many tokens to draft next for one sequence: up by 2 after a step whose drafts were all kept,
    down by 1 after a rejection, within 1 .. k_max. A step with no proposal changes nothing."""

    def __init__(self, k_max: int):
        self.k_max = self.k = k_max

    def update(self, proposed: int, accepted: int) -> None:
        if proposed:
            self.k = min(self.k_max, self.k + 2) if accepted == proposed else max(1, self.k - 1)


@dataclass
class Speculation:
    """One sequence's speculative state: its K, the target state for its drafter, its counts."""

    k: AdaptiveK
    hidden: torch.Tensor | None = None  # the target's hidden state that produced the last token
    drafted: int = 0
    accepted: int = 0

    def record(self, proposed: int, accepted: int) -> None:
        self.drafted += proposed
        self.accepted += accepted
        self.k.update(proposed, accepted)


def draft_room(cache: "KVCache") -> int:
    """Tokens one step may draft in this cache: a sliding ring with `tail` spare slots can be rolled back
    by tail + 1 positions (the slots the verify step overwrote held only positions before the window)."""
    spare = [layer.capacity - cache.window for layer in cache.layers if layer.ring]
    return max(0, min(spare) + 1) if spare else MAX_DRAFT


def propose(drafter, ctx: DraftContext, k: int) -> tuple[list[int], torch.Tensor | None]:
    """The drafter's proposal, cut to k tokens and checked."""
    if k <= 0:
        return [], None
    drafts, q = drafter.propose(ctx, k)
    drafts = [int(t) for t in drafts][:k]
    if q is not None:
        q = q[:len(drafts)].float()
        if q.shape != (len(drafts), ctx.decoder.config.vocab_size):
            raise ValueError(f"drafter: draft probabilities of shape {tuple(q.shape)}, expected "
                             f"({len(drafts)}, {ctx.decoder.config.vocab_size})")
    vocab = ctx.decoder.config.vocab_size
    if any(not 0 <= t < vocab for t in drafts):
        raise ValueError(f"drafter: a proposed token id is outside the vocabulary [0, {vocab})")
    return drafts, q


def verify_batch(rows: list[tuple[int, int, list[int]] | None], pad_id: int, device
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """ids and positions [B, T] of one verify forward: per row (last token, its position, drafts), right
    padded at position -1 (not written, outputs ignored); None: a row that takes no part."""
    width = max((1 + len(r[2]) for r in rows if r is not None), default=1)
    if width == 1:  # a plain decode step: one token per row, two tensors built from lists
        ids = torch.tensor([[pad_id if r is None else r[0]] for r in rows], dtype=torch.long)
        pos = torch.tensor([[-1 if r is None else r[1]] for r in rows], dtype=torch.long)
        return ids.to(device), pos.to(device)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.full((len(rows), width), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        if r is None:
            continue
        last, position, drafts = r
        n = 1 + len(drafts)
        ids[b, :n] = torch.tensor([last, *drafts], dtype=torch.long)
        pos[b, :n] = torch.arange(position, position + n)
    return ids.to(device), pos.to(device)


def verify_logits(decoder, hidden: torch.Tensor, pos: torch.Tensor) -> list[torch.Tensor]:
    """Per row, the target's logits [n, V] at its n real (not padding) positions, through one head call."""
    if pos.shape[1] == 1 and pos.shape[0] and bool(pos.min() >= 0):  # a plain decode step: every row one position
        return list(decoder.logits(hidden[:, 0]).split(1))
    valid = pos >= 0
    flat = decoder.logits(hidden[valid])
    return list(flat.split(valid.sum(dim=1).tolist()))


def accept(logits: torch.Tensor, drafts: list[int], q: torch.Tensor | None, params: SamplingParams,
           output_ids: list[int], generator: torch.Generator | None) -> list[int]:
    """The tokens one verify step yields: the accepted drafts, then one token of the target's.

    logits [n + 1, V]: the target's raw logits after tokens + drafts[:i]; q [n, V] or None (one-hot);
    output_ids: the sequence's output so far (penalties see the accepted drafts too)."""
    out: list[int] = []
    for i in range(len(drafts) + 1):
        row = apply_penalties(logits[i], output_ids + out, params)
        if params.greedy:
            token = greedy_token(row)
            out.append(token)
            if i == len(drafts) or token != drafts[i]:
                return out
            continue
        p = distribution(row, params)
        if i == len(drafts):
            out.append(int(torch.multinomial(p, 1, generator=generator)))
            return out
        d = drafts[i]
        qd = 1.0 if q is None else float(q[i, d])
        u = float(torch.rand((), generator=generator, device=_device(generator)))
        if u * qd < float(p[d]):  # u < p/q: kept with probability min(1, p/q)
            out.append(d)
            continue
        if q is None:
            residual = p.clone()
            residual[d] = 0.0
        else:
            residual = (p - q[i].to(p.device)).clamp(min=0.0)
        if float(residual.sum()) <= 0.0:  # p <= q everywhere only when p == q: then nothing is rejected
            residual = p
        out.append(int(torch.multinomial(residual, 1, generator=generator)))
        return out
    return out


def _device(generator: torch.Generator | None):
    return generator.device if generator is not None else "cpu"
