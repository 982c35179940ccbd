"""What a layer store is: one decoder layer's K and V for every row of a cache.

A sliding layer keeps a ring per row (ring.py), a full layer a block pool shared by the rows (paged.py); both
hold their stored tensors by name in `data` ("k", "v", and with int8 their "_scale"s, codec.py) and answer
the same calls with the same meaning, so KVCache and attention treat them alike.

Full layers with K=V keep one tensor: the normed values. Attention rebuilds keys from them (values *
k_norm weight, then RoPE), which halves the long-context memory.

A layer is called for some of its rows (a view, `rows`): None for all of them in batch order, a slice
for consecutive ones, or an index tensor.
"""

from __future__ import annotations

import ctypes

import torch

from .codec import Codec


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """torch.zeros, filled by one serial memset on the CPU: torch fills a tensor of this size in a parallel region,
    whose other thread a busy machine schedules late (~15 ms a tensor; a cache makes dozens of them)."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    t = torch.empty(shape, dtype=dtype)
    ctypes.memset(t.data_ptr(), 0, t.numel() * t.element_size())
    return t


def row_list(rows, batch: int) -> list[int]:
    """Cache rows of a view (None: 0 .. batch-1; a slice; an index tensor) as a list."""
    if rows is None:
        return list(range(batch))
    if isinstance(rows, slice):
        return list(range(rows.start, rows.stop))
    return [int(r) for r in rows]


def rows_of(t: torch.Tensor, rows) -> torch.Tensor:
    """Rows of a cache tensor (a view for a slice, a gather for an index)."""
    return t if rows is None else t[rows]


class LayerKV:
    """One layer's stored K (absent on K=V layers) and V, as its codec stores them. `ring`: a sliding
    layer's ring (it holds only the last positions of a row) rather than a full layer's pool."""

    ring: bool

    def __init__(self, head_dim: int, keys: bool, dtype: torch.dtype, kv_dtype: str):
        self.codec = Codec(kv_dtype, head_dim, dtype)
        self.dtype = dtype
        self.names = (["k"] if keys else []) + ["v"]
        self.data: dict[str, torch.Tensor] = {}

    @property
    def k(self) -> torch.Tensor | None:
        return self.data.get("k")

    @property
    def v(self) -> torch.Tensor:
        return self.data["v"]

    def _encode(self, k: torch.Tensor | None, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """k (ignored on K=V layers), v [B, KV, T, D] as stored: one tensor per stored name."""
        stored = self.codec.encode("v", v)
        if k is not None and "k" in self.names:
            stored.update(self.codec.encode("k", k))
        return stored

    # What both stores do, each its own way.
    def write(self, k: torch.Tensor | None, v: torch.Tensor, pos: torch.Tensor, rows=None) -> None:
        """k, v: [B, KV, T, D]; pos: [B, T] absolute positions, -1 for padding (not written).
        rows: the cache row of each batch row (default: batch row b is cache row b)."""
        raise NotImplementedError

    def update(self, k: torch.Tensor | None, v: torch.Tensor, pos: torch.Tensor, rows=None, chunk: int | None = None):
        """Store a chunk and return what its queries attend over, the chunk included: an iterable of
        (k, v, kpos) pieces (k None on K=V layers, kpos -1 for an empty slot)."""
        raise NotImplementedError

    def clear(self, row: int) -> None:
        """Forget row `row`'s contents."""
        raise NotImplementedError

    def truncate(self, row: int, length: int) -> None:
        """Forget row `row`'s positions >= length."""
        raise NotImplementedError

    def keys_values(self, row: int, n: int):
        """(k or None, v, pos) of what row `row` holds below position n, in position order, decoded:
        [KV, m, D], [m]."""
        raise NotImplementedError

    def snapshot(self, row: int, length: int) -> dict[str, torch.Tensor]:
        """Copies of what row `row` holds of positions [0, length), in position order: "pos" [n] and
        one [KV, n, X] tensor per stored name."""
        raise NotImplementedError

    def restore(self, row: int, snap: dict[str, torch.Tensor], upto: int) -> None:
        """Row `row` becomes the snapshot's positions below `upto` (and nothing else)."""
        raise NotImplementedError

    def nbytes(self) -> int:
        """Bytes allocated."""
        raise NotImplementedError
