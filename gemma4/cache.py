"""KV memory for generation.

Each layer keeps its keys and values with the absolute position of every slot (-1: empty), so the
attention mask is computed from positions alone and a batch of prompts of different lengths (left
padded, pads at position -1) shares one layout.

- Sliding layers keep a ring of `sliding_window + tail` slots: position p lives in slot p % slots. The
  mask limits attention to the window; the `tail` extra slots keep the positions just before the
  window, so a snapshot taken at length L can be restored at any length c >= L - tail (prefix reuse).
- Full layers keep slot == position and grow by doubling (or are allocated to a known length).
- Full layers with K=V keep one tensor: the normed values. Keys are rebuilt from them at attention
  time (values * k_norm weight, then RoPE), which halves the long-context memory.
- `kv_dtype="int8"` stores K and V as int8 with one float32 scale per group of 32 elements of a
  (token, head) vector, dequantised when attention reads it: 0.56 of the bytes of bf16. One scale per
  whole vector costs 10-400x more KL than bf16 rounding on the test models (scores use scale 1.0, so
  attention is sharp); groups of 32 bring it near bf16's.

Rows are independent: a row holds one sequence at its own positions. `KVCache.view(rows)` hands the
model a cache over some rows only, so sequences can be prefilled alone and decoded together, and a
freed row (`clear(row)`) is taken by the next request. `snapshot(row, length)` copies a row's first
`length` positions out (what a sliding ring still holds of them) and `restore(row, snap, upto)` puts
them back into a row, so a later request sharing the prefix skips its prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig

KV_DTYPES = ("float", "int8")


INT8_GROUP = 32  # elements sharing one scale, as llama.cpp's q8_0 blocks


def int8_group(head_dim: int) -> int:
    """The largest divisor of head_dim not above INT8_GROUP."""
    return max(g for g in range(1, min(INT8_GROUP, head_dim) + 1) if head_dim % g == 0)


def quantize_int8(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., D] -> int8 values [..., D] and float32 scales [..., D / group]: x ~ q * scale per group."""
    g = x.float().unflatten(-1, (-1, group))
    scale = g.abs().amax(dim=-1).clamp(min=1e-12) / 127.0
    q = (g / scale[..., None]).round().clamp(-127, 127).to(torch.int8)
    return q.flatten(-2), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.unflatten(-1, (scale.shape[-1], -1)).float() * scale[..., None]).flatten(-2).to(dtype)


class LayerKV:
    def __init__(self, batch: int, kv_heads: int, head_dim: int, capacity: int, ring: bool, keys: bool,
                 dtype: torch.dtype, device: torch.device, kv_dtype: str = "float"):
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_cache: unknown {kv_dtype!r} (use one of {', '.join(KV_DTYPES)})")
        self.ring = ring
        self.capacity = capacity
        self.dtype = dtype  # what attention reads
        self.int8 = kv_dtype == "int8"
        self.group = int8_group(head_dim)
        names = (["k"] if keys else []) + ["v"]
        self.data: dict[str, torch.Tensor] = {}  # every tensor [B, KV, slots, D or D / group]
        for n in names:
            self.data[n] = torch.zeros((batch, kv_heads, capacity, head_dim), device=device,
                                       dtype=torch.int8 if self.int8 else dtype)
            if self.int8:
                self.data[n + "_scale"] = torch.zeros((batch, kv_heads, capacity, head_dim // self.group),
                                                      dtype=torch.float32, device=device)
        self.pos = torch.full((batch, capacity), -1, dtype=torch.long, device=device)
        self.top = 0  # one past the furthest slot written (full layers)

    @property
    def k(self) -> torch.Tensor | None:
        return self.data.get("k")

    @property
    def v(self) -> torch.Tensor:
        return self.data["v"]

    def _grow(self, needed: int) -> None:
        new_cap = max(needed, 2 * self.capacity)
        pad = new_cap - self.capacity
        for n, t in self.data.items():
            extra = torch.zeros((*t.shape[:2], pad, t.shape[3]), dtype=t.dtype, device=t.device)
            self.data[n] = torch.cat([t, extra], dim=2)
        self.pos = torch.cat([self.pos, self.pos.new_full((self.pos.shape[0], pad), -1)], dim=1)
        self.capacity = new_cap

    def _encode(self, name: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.int8:
            return {name: x}
        q, scale = quantize_int8(x, self.group)
        return {name: q, name + "_scale": scale}

    def _read(self, name: str, rows, start: int = 0, stop: int | None = None) -> torch.Tensor | None:
        if name not in self.data:
            return None
        t = _rows(self.data[name], rows, start, stop)
        if self.int8:
            t = dequantize_int8(t, _rows(self.data[name + "_scale"], rows, start, stop), self.dtype)
        return t

    def write(self, k: torch.Tensor | None, v: torch.Tensor, pos: torch.Tensor, rows=None) -> None:
        """k, v: [B, KV, T, D]; pos: [B, T] absolute positions, -1 for padding (not written).
        rows: the cache row of each batch row (default: batch row b is cache row b)."""
        keep = pos >= 0
        if self.ring:
            # Only the last `capacity` tokens of a chunk survive; writing only them keeps slots unique.
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
        new = self._encode("v", v)
        if k is not None and "k" in self.data:
            new.update(self._encode("k", k))
        for n, x in new.items():
            self.data[n][r_idx, :, s_idx] = x[b_idx, :, t_idx]
        self.pos[r_idx, s_idx] = pos[b_idx, t_idx]

    def used(self) -> int:
        """Slots worth attending over: the whole ring, or up to the furthest written position."""
        return self.capacity if self.ring else self.top

    def update(self, k: torch.Tensor | None, v: torch.Tensor, pos: torch.Tensor, rows=None, chunk: int | None = None):
        """Store a chunk and return the (k, v, kpos) to attend over, the chunk included, as a list of
        pieces of at most `chunk` slots each (None: one piece): attention merges them, so no piece of the
        whole context is ever dequantised or upcast at once. k is None on K=V layers.

        A ring written before attending would lose positions that earlier queries of a multi-token
        chunk still see, so for chunks the ring's old contents are joined to the new tokens instead.
        """
        if self.ring and pos.shape[1] > 1:
            old_k, old_v, old_pos = self._read("k", rows), self._read("v", rows), _rows(self.pos, rows)
            out_k = None if k is None else torch.cat([old_k, k], dim=2)
            out = (out_k, torch.cat([old_v, v], dim=2), torch.cat([old_pos, pos], dim=1))
            self.write(k, v, pos, rows)
            return [out]
        self.write(k, v, pos, rows)
        n = self.used()
        step = n if chunk is None or self.ring else max(1, chunk)
        return _Pieces(self, rows, n, step)

    def clear(self, row: int) -> None:
        """Forget row `row`'s contents (its slots read as empty)."""
        self.pos[row] = -1

    def snapshot(self, row: int, length: int) -> dict[str, torch.Tensor]:
        """Copies of what row `row` holds of positions [0, length), in position order: "pos" [n] and
        one [KV, n, D] tensor per stored name."""
        pos = self.pos[row]
        slots = ((pos >= 0) & (pos < length)).nonzero(as_tuple=True)[0]
        slots = slots[torch.argsort(pos[slots])]
        out = {n: t[row, :, slots].clone() for n, t in self.data.items()}
        out["pos"] = pos[slots].clone()
        return out

    def restore(self, row: int, snap: dict[str, torch.Tensor], upto: int) -> None:
        """Row `row` becomes the snapshot's positions below `upto` (and nothing else)."""
        self.clear(row)
        keep = snap["pos"] < upto
        if self.ring:
            keep &= snap["pos"] >= upto - self.capacity
        pos = snap["pos"][keep].to(self.pos.device)
        if pos.numel() == 0:
            return
        if not self.ring:
            if upto > self.capacity:
                self._grow(upto)
            self.top = max(self.top, upto)
        slots = pos % self.capacity if self.ring else pos
        for n, t in self.data.items():
            t[row, :, slots] = snap[n][:, keep].to(t.device, t.dtype)
        self.pos[row, slots] = pos

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.data.values())


def _row_index(rows, device) -> torch.Tensor:
    if isinstance(rows, slice):
        return torch.arange(rows.start, rows.stop, device=device)
    return rows


def _rows(t: torch.Tensor | None, rows, start: int = 0, stop: int | None = None) -> torch.Tensor | None:
    """Rows of a cache tensor (a view for a slice, a gather for an index), slots cut to [start, stop)."""
    if t is None:
        return None
    if start or stop is not None:
        t = t[:, :, start:stop] if t.dim() == 4 else t[:, start:stop]
    if rows is not None:
        t = t[rows]
    return t


class _Pieces:
    """The slots [0, n) of some rows of a layer, read lazily `step` slots at a time: (k, v, kpos)."""

    def __init__(self, layer: "LayerKV", rows, n: int, step: int):
        self.layer, self.rows, self.n, self.step = layer, rows, n, step

    def __iter__(self):
        layer = self.layer
        for a in range(0, self.n, self.step):
            b = min(self.n, a + self.step)
            yield layer._read("k", self.rows, a, b), layer._read("v", self.rows, a, b), _rows(layer.pos, self.rows, a, b)


class RowsView:
    """One layer of the cache seen through some of its rows: what attention calls update() on."""

    def __init__(self, layer: LayerKV, rows):
        self.layer, self.rows = layer, rows

    def update(self, k, v, pos, chunk: int | None = None):
        return self.layer.update(k, v, pos, self.rows, chunk)


@dataclass
class Snapshot:
    """A sequence's KV for its first len(tokens) positions, taken out of a cache row.

    Full layers hold every position; sliding layers hold the last `ring` positions at most, so the
    snapshot can resume a sequence at length c only if those reach back to the window before c.
    """

    tokens: list[int]
    layers: list[dict[str, torch.Tensor]]
    window: int
    kv_dtype: str

    @property
    def ring_start(self) -> int:
        """The first position every sliding layer still holds (0 when they hold everything)."""
        starts = [int(layer["pos"][0]) for layer in self.layers if layer.get("ring") is not None
                  and layer["pos"].numel()]
        return max(starts, default=0)

    def usable(self, c: int) -> bool:
        """Can a sequence resume at length c (the next position computed is c) from this snapshot?
        A query at c sees keys c-window+1 .. c: the sliding layers must still hold c-window+1 .. c-1."""
        return 0 < c <= len(self.tokens) and self.ring_start <= max(0, c - self.window + 1)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.values())


class KVCache:
    """One LayerKV per decoder layer for a batch of sequences."""

    def __init__(self, config: ModelConfig, batch: int = 1, capacity: int = 256,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", tail: int = 0,
                 kv_dtype: str = "float"):
        device = torch.device(device)
        if tail < 0:
            raise ValueError(f"tail: must be at least 0, got {tail}")
        self.window = config.sliding_window
        self.kv_dtype = kv_dtype
        self.layers = []
        for i in range(config.num_hidden_layers):
            ring = config.is_sliding(i)
            cap = config.sliding_window + tail if ring else max(1, capacity)
            self.layers.append(LayerKV(batch, config.kv_heads_of(i), config.head_dim_of(i), cap, ring,
                                       keys=not config.k_eq_v(i), dtype=dtype, device=device, kv_dtype=kv_dtype))

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

    def snapshot(self, row: int, tokens: list[int]) -> Snapshot:
        """Row `row` holding the sequence `tokens` (positions 0 .. len-1): a copy of its KV."""
        layers = []
        for layer in self.layers:
            snap = layer.snapshot(row, len(tokens))
            if layer.ring:
                snap["ring"] = torch.tensor(layer.capacity)
            layers.append(snap)
        return Snapshot(list(tokens), layers, self.window, self.kv_dtype)

    def restore(self, row: int, snap: Snapshot, upto: int) -> None:
        """Row `row` resumes the snapshot's sequence at length `upto` (see Snapshot.usable)."""
        if not snap.usable(upto):
            raise ValueError(f"snapshot cannot resume at {upto} tokens (its sliding layers start at "
                             f"{snap.ring_start})")
        if snap.kv_dtype != self.kv_dtype or len(snap.layers) != len(self.layers):
            raise ValueError(f"snapshot of a {snap.kv_dtype} cache with {len(snap.layers)} layers does not fit "
                             f"a {self.kv_dtype} cache with {len(self.layers)} layers")
        for layer, s in zip(self.layers, snap.layers):
            layer.restore(row, s, upto)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


class CacheView:
    """What the model reads: one entry per layer with update(k, v, pos)."""

    def __init__(self, layers: list[RowsView]):
        self.layers = layers
