"""A prompt prefilled through a prompt-cache file (kv/files.py): the file's KV resumes the prompt where
its tokens begin it, and the document's KV is saved there for the next run."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..kv.files import load, save
from ..kv.prefix import prompt_key
from .runner import joined_columns, prefill, resume_points, soft_embeds


class PromptCache:
    """What the engine uses for one prompt whose first `prefix_len` tokens (the document) are
    worth keeping: it reuses `path` when the file's tokens begin the prompt, else saves the document's
    KV there, up to the last grid point of the prefill's chunks within it (resume_points), so a
    run that reloads it prefills the rest in the chunks a run without the file does: the same logits,
    bit for bit. After the prefill, `reused` and `saved` tell what happened (token counts)."""

    def __init__(self, path: str | Path, prefix_len: int):
        self.path = Path(path)
        self.prefix_len = prefix_len
        self.reused = 0
        self.saved = 0

    def prefill(self, decoder, ids: list[int], capacity: int, chunk: int,
                progress: Callable[[int, int], None] | None = None, soft: list | None = None, tail: int = 0):
        """Returns (cache, last hidden state) for `ids` as runner.prefill would; soft: the prompt's image
        embeddings [(offset, embeddings)], whose runs are keyed in the file by their values; tail: the
        cache's spare ring slots (decoder.new_cache)."""
        key = prompt_key(ids, soft)
        embeds, mask = soft_embeds([(len(ids), soft or [])], len(ids), decoder.config.hidden_size,
                                   decoder.dtype, decoder.device)
        cache = decoder.new_cache(batch=1, capacity=capacity, tail=tail)
        joined = joined_columns(mask)
        start = held = 0
        if self.path.exists():
            snap = load(self.path, decoder, cache.kv_dtype)
            n = len(snap.tokens)
            if 0 < n <= len(ids) and key[:n] == snap.tokens:
                held = n  # the file holds this prompt's first n tokens
                # resumed only at a chunk end of this prefill (a file cut for another chunk size is not)
                if n < len(ids) and n in resume_points(len(ids), chunk, joined, most=None):
                    cache.restore(0, snap, n)
                    start = n
        self.reused = start
        # The document's resume point: where its last chunk on the grid ends (a question follows it).
        points = resume_points(min(self.prefix_len, len(ids) - 1) + 1, chunk, joined)
        keep = points[-1] if points and points[-1] > held else 0  # never a shorter copy over a longer one
        t = torch.tensor([ids], dtype=torch.long, device=decoder.device)
        pos = torch.arange(len(ids), device=decoder.device)[None]

        def on_hidden(a: int, hidden: torch.Tensor) -> None:
            if keep and a + hidden.shape[1] == keep:
                save(self.path, cache.snapshot(0, key[:keep]), decoder)
                self.saved = keep

        part = {} if mask is None else dict(embeds=embeds, embeds_mask=mask)
        hidden = prefill(decoder, cache, t, pos, chunk, on_hidden=on_hidden, progress=progress, start=start, **part)
        return cache, hidden
