"""The runner: a batch of rows -> positions and ids -> the decoder -> logits.

Prefill runs in chunks that end on a grid of absolute positions (chunk_end), so a prefill resumed at a
grid point (prefix reuse, prompt-cache files: resume_points) computes every later position exactly as a
prefill from position 0 does. A decode step is a verify forward whose rows carry no drafts: each row feeds
its last token and its drafts (speculative.verify.verify_batch) and gets the logits at each of them.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from ..model.decoder import Decoder
from ..native.ops import prefill_products
from ..kv import prompt_key
from ..speculative.verify import verify_batch, verify_logits

PREFILL_CHUNK = 512


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
    with prefill_products():
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


class Runner:
    """Forwards over the engine's KV cache: one row's prefill chunk, or a decode / verify step over rows."""

    def __init__(self, decoder: Decoder, cache, prefill_chunk: int = PREFILL_CHUNK):
        if prefill_chunk < 1:
            raise ValueError(f"prefill chunk: must be at least 1, got {prefill_chunk}")
        self.decoder = decoder
        self.cache = cache
        self.prefill_chunk = prefill_chunk

    def soft_embeds(self, prompt_len: int, soft: list) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
        """(embeds, mask, joined columns) over one prompt with image soft tokens."""
        d = self.decoder
        embeds, mask = soft_embeds([(prompt_len, soft)], prompt_len, d.config.hidden_size, d.dtype, d.device)
        return embeds, mask, joined_columns(mask)

    def chunk_end(self, start: int, length: int, joined: list[bool] | None) -> int:
        return chunk_end(start, length, self.prefill_chunk, joined)

    def resume_points(self, length: int, joined: list[bool] | None, most: int | None = 2) -> list[int]:
        return resume_points(length, self.prefill_chunk, joined, most)

    def prefill(self, row: int, prompt: list[int], start: int, end: int, soft: tuple | None = None) -> torch.Tensor:
        """Prompt positions [start, end) of `row` through the model; their hidden states [end - start, H].
        soft: the prompt's (embeds, mask, ...) from soft_embeds."""
        d = self.decoder
        part = {} if soft is None else dict(embeds=soft[0][:, start:end], embeds_mask=soft[1][:, start:end])
        ids = torch.tensor([prompt[start:end]], dtype=torch.long, device=d.device)
        pos = torch.arange(start, end, device=d.device)[None]
        with prefill_products():
            return d(ids, pos, self.cache.view([row]), **part)[0]

    def prefill_from(self, prompt_cache, row: int, prompt: list[int], max_tokens: int, soft: list,
                     progress=None) -> torch.Tensor:
        """A prompt prefilled through a prompt-cache file (engine/prompt_cache.py) into `row`; its last
        hidden state [H]. The file's own cache holds the prompt; the row takes a copy of it."""
        own, hidden = prompt_cache.prefill(self.decoder, prompt, len(prompt) + max_tokens, self.prefill_chunk,
                                           progress, soft=soft)
        if own.kv_dtype != self.cache.kv_dtype:
            raise ValueError(f"prompt cache: a {own.kv_dtype} KV file cannot serve a {self.cache.kv_dtype} KV cache")
        self.cache.restore(row, own.snapshot(0, prompt_key(prompt, soft)), len(prompt))
        return hidden[0]

    def step(self, rows: list[int], plans: list[tuple[int, int, list[int]]]
             ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One forward over rows, each feeding (last token, its position, drafts): the hidden states
        [B, T, H] and, per row, the logits [1 + drafts, V] (one head call for every row's positions)."""
        d = self.decoder
        ids, pos = verify_batch(plans, 0, d.device)
        hidden = d(ids, pos, self.cache.view(rows))
        return hidden, verify_logits(d, hidden, pos)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [V] of one hidden state [H]."""
        return self.decoder.logits(hidden[None])[0]
