"""KV memory for generation.

Each layer keeps its keys and values with the absolute position of every slot (-1: empty), so the
attention mask is computed from positions alone and a batch of prompts of different lengths (left
padded, pads at position -1) shares one layout.

- Sliding layers keep a ring of `sliding_window` slots: position p lives in slot p % window.
- Full layers keep slot == position and grow by doubling (or are allocated to a known length).
- Full layers with K=V keep one tensor: the normed values. Keys are rebuilt from them at attention
  time (values * k_norm weight, then RoPE), which halves the long-context memory.

Rows are independent: a row holds one sequence at its own positions. `KVCache.view(rows)` hands the
model a cache over some rows only, so sequences can be prefilled alone and decoded together, and a
freed row (`clear(row)`) is taken by the next request.
"""

from __future__ import annotations

import torch

from .config import ModelConfig


class LayerKV:
    def __init__(self, batch: int, kv_heads: int, head_dim: int, capacity: int, ring: bool, keys: bool,
                 dtype: torch.dtype, device: torch.device):
        self.ring = ring
        self.capacity = capacity
        shape = (batch, kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device) if keys else None
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.pos = torch.full((batch, capacity), -1, dtype=torch.long, device=device)
        self.top = 0  # one past the furthest slot written (full layers)

    def _grow(self, needed: int) -> None:
        new_cap = max(needed, 2 * self.capacity)
        pad = new_cap - self.capacity

        def grow(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            extra = torch.zeros((*t.shape[:2], pad, t.shape[3]), dtype=t.dtype, device=t.device)
            return torch.cat([t, extra], dim=2)

        self.k, self.v = grow(self.k), grow(self.v)
        self.pos = torch.cat([self.pos, self.pos.new_full((self.pos.shape[0], pad), -1)], dim=1)
        self.capacity = new_cap

    def write(self, k: torch.Tensor | None, v: torch.Tensor, pos: torch.Tensor, rows=None) -> None:
        """k, v: [B, KV, T, D]; pos: [B, T] absolute positions, -1 for padding (not written).
        rows: the cache row of each batch row (default: batch row b is cache row b)."""
        keep = pos >= 0
        if self.ring:
            # Only the last `window` tokens of a chunk survive; writing only them keeps slots unique.
            newest = pos.max(dim=1, keepdim=True).values
            keep &= pos > newest - self.capacity
            slots = pos % self.capacity
        else:
            slots = pos
            top = int(pos.max()) + 1
            if top > self.capacity:
                self._grow(top)
            self.top = max(self.top, top)
        b_idx, t_idx = keep.nonzero(as_tuple=True)
        s_idx = slots[b_idx, t_idx]
        r_idx = b_idx if rows is None else _row_index(rows, pos.device)[b_idx]
        if self.k is not None:
            self.k[r_idx, :, s_idx] = k[b_idx, :, t_idx]
        self.v[r_idx, :, s_idx] = v[b_idx, :, t_idx]
        self.pos[r_idx, s_idx] = pos[b_idx, t_idx]

    def used(self) -> int:
        """Slots worth attending over: the whole ring, or up to the furthest written position."""
        return self.capacity if self.ring else self.top

    def update(self, k: torch.Tensor | None, v: torch.Tensor, pos: torch.Tensor, rows=None):
        """Store a chunk and return (k, v, kpos) to attend over, the chunk included.

        A ring written before attending would lose positions that earlier queries of a multi-token
        chunk still see, so for chunks the ring's old contents are joined to the new tokens instead.
        """
        if self.ring and pos.shape[1] > 1:
            old_k, old_v, old_pos = (_rows(t, rows) for t in (self.k, self.v, self.pos))
            out_k = None if k is None else torch.cat([old_k, k], dim=2)
            out = (out_k, torch.cat([old_v, v], dim=2), torch.cat([old_pos, pos], dim=1))
            self.write(k, v, pos, rows)
            return out
        self.write(k, v, pos, rows)
        n = self.used()
        return _rows(self.k, rows, n), _rows(self.v, rows, n), _rows(self.pos, rows, n)

    def clear(self, row: int) -> None:
        """Forget row `row`'s contents (its slots read as empty)."""
        self.pos[row] = -1


def _row_index(rows, device) -> torch.Tensor:
    if isinstance(rows, slice):
        return torch.arange(rows.start, rows.stop, device=device)
    return rows


def _rows(t: torch.Tensor | None, rows, n: int | None = None) -> torch.Tensor | None:
    """Rows of a cache tensor (a view for a slice, a gather for an index), slots cut to n."""
    if t is None:
        return None
    if rows is not None:
        t = t[rows]
    if n is not None:
        t = t[:, :, :n] if t.dim() == 4 else t[:, :n]
    return t


class RowsView:
    """One layer of the cache seen through some of its rows: what attention calls update() on."""

    def __init__(self, layer: LayerKV, rows):
        self.layer, self.rows = layer, rows

    def update(self, k, v, pos):
        return self.layer.update(k, v, pos, self.rows)


class KVCache:
    """One LayerKV per decoder layer for a batch of sequences."""

    def __init__(self, config: ModelConfig, batch: int = 1, capacity: int = 256,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        device = torch.device(device)
        self.layers = []
        for i in range(config.num_hidden_layers):
            ring = config.is_sliding(i)
            cap = config.sliding_window if ring else max(1, capacity)
            self.layers.append(LayerKV(batch, config.kv_heads_of(i), config.head_dim_of(i), cap, ring,
                                       keys=not config.k_eq_v(i), dtype=dtype, device=device))

    @property
    def batch(self) -> int:
        return self.layers[0].pos.shape[0] if self.layers else 0

    def view(self, rows) -> "CacheView":
        """The cache over `rows` (a list of row numbers, in batch order), for one model call."""
        rows = list(rows)
        if rows == list(range(rows[0], rows[0] + len(rows))):
            index = slice(rows[0], rows[0] + len(rows))  # contiguous: views, no copies
        else:
            index = torch.tensor(rows, dtype=torch.long, device=self.layers[0].pos.device)
        return CacheView([RowsView(layer, index) for layer in self.layers])

    def clear(self, row: int) -> None:
        for layer in self.layers:
            layer.clear(row)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in (layer.k, layer.v) if t is not None)


class CacheView:
    """What the model reads: one entry per layer with update(k, v, pos)."""

    def __init__(self, layers: list[RowsView]):
        self.layers = layers
