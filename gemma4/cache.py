"""KV memory for generation.

- Sliding layers keep, per row, a ring of `sliding_window + tail` slots (rounded up to whole chunks of
  the attention kernel, ring_slots) with the absolute position of every slot (-1: empty): position p
  lives in slot p % slots, and the attention mask is computed from positions alone. The `tail` extra slots keep the positions just before the window, so a row can be
  truncated back by up to `tail` positions (speculative decoding's rollback).
- Full layers keep their KV in a block pool shared by all rows (kv_pool.py): memory follows what the
  rows hold, block by block, not rows x the longest row; with a fixed number of blocks (the KV budget)
  it never grows.
- Full layers with K=V keep one tensor: the normed values. Attention rebuilds keys from them (values *
  k_norm weight, then RoPE), which halves the long-context memory.
- `kv_dtype="int8"` stores K and V as int8 with one float32 scale per group of 32 values (kv_int8.py).

Rows are independent: a row holds one sequence at its own positions (a batch of prompts of different
lengths is left padded, pads at position -1). `KVCache.view(rows)` hands the model a cache over some
rows only, so sequences can be prefilled alone and decoded together, and a freed row (`clear(row)`) is
taken by the next request. `snapshot(row, tokens)` copies a row's first positions out (what a sliding
ring still holds of them) and `restore(row, snap, upto)` puts them back into a row, so a later request
sharing the prefix skips its prefill. `truncate(row, length)` forgets positions >= length (speculative
decoding's rollback); `keys_values(layer, row, n)` reads a row's stored K and V below position n.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig

from .kv_int8 import KV_DTYPES, Codec
from .kv_pool import BLOCK_TOKENS, BlockTable, PagedKV, row_list
from .native.ops import ATTENTION_CHUNK, put_tokens

__all__ = ["KV_DTYPES", "BLOCK_TOKENS", "KVCache", "Snapshot", "RingKV", "PagedKV"]


def ring_slots(window: int, tail: int) -> int:
    """A ring's slots: the window and at least `tail` more, in whole chunks of the attention kernel, with
    room for a chunk's worth beside the window: each chunk of slots then holds keys of a single run of 64
    positions that a query sees (with less room, the chunk being written would hold the newest keys and
    the oldest the window still sees), so a decode step's arithmetic is the same whatever the tail (a
    speculative run's rings and a plain one's, or a server's, give the same bits)."""
    return -(-(window + max(tail, ATTENTION_CHUNK - 1)) // ATTENTION_CHUNK) * ATTENTION_CHUNK


class RingKV:
    """One sliding layer: per row a ring of `capacity` slots [rows, KV heads, capacity, D], with positions."""

    ring = True

    def __init__(self, batch: int, kv_heads: int, head_dim: int, capacity: int, keys: bool,
                 dtype: torch.dtype, device: torch.device, kv_dtype: str = "float", window: int | None = None):
        self.capacity = capacity
        self.window = capacity if window is None else window  # keys a query sees: p - window + 1 .. p
        self.codec = Codec(kv_dtype, head_dim, dtype)
        self.dtype = dtype
        self.names = (["k"] if keys else []) + ["v"]
        self.data: dict[str, torch.Tensor] = {  # every tensor [B, KV, slots, D or D / group]
            n: torch.zeros((batch, kv_heads, capacity, last), dtype=dt, device=device)
            for name in self.names for n, (last, dt) in self.codec.shapes(name, head_dim).items()}
        self.pos = torch.full((batch, capacity), -1, dtype=torch.long, device=device)

    @property
    def k(self) -> torch.Tensor | None:
        return self.data.get("k")

    @property
    def v(self) -> torch.Tensor:
        return self.data["v"]

    def _read(self, rows, order: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The rows' stored k (None on K=V layers) and v, decoded, of all slots or, per row, the slots
        order [B, m] names (each stored tensor gathered once)."""
        got = {n: _rows(t, rows) for n, t in self.data.items()}
        if order is not None:
            got = {n: t.gather(2, order[:, None, :, None].expand(t.shape[0], t.shape[1], -1, t.shape[3]))
                   for n, t in got.items()}
        return self.codec.decode(got, "k"), self.codec.decode(got, "v")

    def write(self, k: torch.Tensor | None, v: torch.Tensor, pos: torch.Tensor, rows=None) -> None:
        """k, v: [B, KV, T, D]; pos: [B, T] absolute positions, -1 for padding (not written).
        rows: the cache row of each batch row (default: batch row b is cache row b)."""
        new = self.codec.encode("v", v)
        if k is not None and "k" in self.names:
            new.update(self.codec.encode("k", k))
        if pos.shape[1] == 1:  # a decode step: one position per row, written in place
            rows, ps = row_list(rows, pos.shape[0]), pos[:, 0].tolist()
            if put_tokens(self.data, new, [r if p >= 0 else -1 for r, p in zip(rows, ps)],
                          [p % self.capacity for p in ps], self.pos, ps):
                return
            for b, (r, p) in enumerate(zip(rows, ps)):
                if p >= 0:
                    slot = p % self.capacity
                    for n, x in new.items():
                        self.data[n][r, :, slot] = x[b, :, 0]
                    self.pos[r, slot] = p
            return
        # Only the last `capacity` tokens of a chunk survive; writing only them keeps slots unique.
        newest = pos.max(dim=1, keepdim=True).values
        keep = (pos >= 0) & (pos > newest - self.capacity)
        slots = pos % self.capacity
        b_idx, t_idx = keep.nonzero(as_tuple=True)
        s_idx = slots[b_idx, t_idx]
        r_idx = b_idx if rows is None else torch.tensor(row_list(rows, pos.shape[0]), device=pos.device)[b_idx]
        for n, x in new.items():
            self.data[n][r_idx, :, s_idx] = x[b_idx, :, t_idx]
        self.pos[r_idx, s_idx] = pos[b_idx, t_idx]

    def update(self, k: torch.Tensor | None, v: torch.Tensor, pos: torch.Tensor, rows=None, chunk: int | None = None):
        """Store a chunk and return the (k, v, kpos) to attend over, the chunk included, as a list of
        pieces (here one: a ring is small). k is None on K=V layers.

        A chunk of at most ATTENTION_CHUNK tokens (a verify step of speculative decoding; ring_slots leaves
        room for that many beside the window, whatever the tail) is written first and read whole, as a
        decode step is: each of its queries then sees the same keys in the same slots as a decode step at
        its position (the newer slots are hidden from it), so a verify row gives a decode row's bits.
        A longer chunk written before attending would lose positions that its earlier queries still see,
        so then the ring's old contents are joined to the new tokens instead: only the slots holding a
        position some query of the chunk sees (a fresh prompt attends over its own tokens alone). What a chunk attends over thus depends on its positions alone, not on what
        else the ring still holds (a tail, a row restored from a snapshot, stale slots of a reused row),
        so the same chunk gives the same bits in every such cache.
        """
        if pos.shape[1] > min(ATTENTION_CHUNK, self.capacity - self.window + 1):
            old_pos = _rows(self.pos, rows)
            big = torch.iinfo(old_pos.dtype).max
            first = torch.where(pos >= 0, pos, big).amin(dim=1, keepdim=True)
            seen = (old_pos >= 0) & (old_pos > first - self.window)
            m = int(seen.sum(dim=1).max())
            if m == 0:
                out = (k, v, pos)
            else:  # each row's seen slots in position order (then empty ones, where rows see fewer)
                order = torch.where(seen, old_pos, big).argsort(dim=1)[:, :m]
                old_k, old_v = self._read(rows, order)
                old_pos = torch.where(seen.gather(1, order), old_pos.gather(1, order), -1)
                out_k = None if k is None else torch.cat([old_k, k], dim=2)
                out = (out_k, torch.cat([old_v, v], dim=2), torch.cat([old_pos, pos], dim=1))
            self.write(k, v, pos, rows)
            return [out]
        self.write(k, v, pos, rows)
        return [(*self._read(rows), _rows(self.pos, rows))]

    def clear(self, row: int) -> None:
        """Forget row `row`'s contents (its slots read as empty)."""
        self.pos[row] = -1

    def truncate(self, row: int, length: int) -> None:
        """Forget row `row`'s positions >= length."""
        self.pos[row].masked_fill_(self.pos[row] >= length, -1)

    def earliest(self, row: int) -> int | None:
        """The first position row `row` holds (None: empty)."""
        held = self.pos[row][self.pos[row] >= 0]
        return int(held.min()) if held.numel() else None

    def _slots(self, row: int, length: int) -> torch.Tensor:
        pos = self.pos[row]
        slots = ((pos >= 0) & (pos < length)).nonzero(as_tuple=True)[0]
        return slots[torch.argsort(pos[slots])]

    def keys_values(self, row: int, n: int):
        """(k or None, v, pos) of what row `row` holds below position n, in position order: [KV, m, D], [m]."""
        slots = self._slots(row, n)
        got = {name: t[row, :, slots] for name, t in self.data.items()}
        return self.codec.decode(got, "k"), self.codec.decode(got, "v"), self.pos[row, slots]

    def snapshot(self, row: int, length: int) -> dict[str, torch.Tensor]:
        """Copies of what row `row` holds of positions [0, length), in position order: "pos" [n] and
        one [KV, n, D] tensor per stored name."""
        slots = self._slots(row, length)
        out = {n: t[row, :, slots].clone() for n, t in self.data.items()}
        out["pos"] = self.pos[row, slots].clone()
        return out

    def restore(self, row: int, snap: dict[str, torch.Tensor], upto: int) -> None:
        """Row `row` becomes the snapshot's positions below `upto` (and nothing else)."""
        self.clear(row)
        keep = (snap["pos"] < upto) & (snap["pos"] >= upto - self.capacity)
        pos = snap["pos"][keep].to(self.pos.device)
        if pos.numel() == 0:
            return
        slots = pos % self.capacity
        for n, t in self.data.items():
            t[row, :, slots] = snap[n][:, keep].to(t.device, t.dtype)
        self.pos[row, slots] = pos

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.data.values()) + self.pos.numel() * self.pos.element_size()


def _rows(t: torch.Tensor, rows) -> torch.Tensor:
    """Rows of a cache tensor (a view for a slice, a gather for an index)."""
    return t if rows is None else t[rows]


class RowsView:
    """One layer of the cache seen through some of its rows: what attention calls update() on."""

    def __init__(self, layer, rows):
        self.layer, self.rows = layer, rows

    def update(self, k, v, pos, chunk: int | None = None):
        return self.layer.update(k, v, pos, self.rows, chunk)


@dataclass
class Snapshot:
    """A sequence's KV for its first len(tokens) positions, taken out of a cache row.

    Full layers hold every position; sliding layers hold the last `ring` positions at most, so the
    snapshot can resume a sequence at length c only if those reach back to the window before c.
    `resumes`: the lengths it is meant to resume at (prefix reuse: grid points of the prefill; default
    its whole length).
    """

    tokens: list[int]
    layers: list[dict[str, torch.Tensor]]
    window: int
    kv_dtype: str
    resumes: list[int] | None = None

    def __post_init__(self):
        if self.resumes is None:
            self.resumes = [len(self.tokens)]

    def with_earlier_rings(self, earlier: list[dict[str, torch.Tensor] | None], at: int) -> "Snapshot":
        """This snapshot with its sliding layers reaching back to what `earlier` (KVCache.ring_snapshot of
        the same row at length `at`, before this one was taken) held, so it resumes at `at` too."""
        layers = []
        for now, old in zip(self.layers, earlier):
            if old is None or now.get("ring") is None:
                layers.append(now)
                continue
            first = int(now["pos"][0]) if now["pos"].numel() else at
            lost = old["pos"] < first  # positions the ring no longer held when this one was taken
            joined = {"ring": now["ring"], "pos": torch.cat([old["pos"][lost], now["pos"]])}
            for n in old:
                if n != "pos":  # stored tensors [KV, n, X]
                    joined[n] = torch.cat([old[n][:, lost], now[n]], dim=1)
            layers.append(joined)
        return Snapshot(self.tokens, layers, self.window, self.kv_dtype, sorted({at, *self.resumes}))

    @property
    def ring_start(self) -> int:
        """The first position every sliding layer still holds (0 when they hold everything; the length
        when one holds nothing)."""
        starts = [int(layer["pos"][0]) if layer["pos"].numel() else len(self.tokens)
                  for layer in self.layers if layer.get("ring") is not None]
        return max(starts, default=0)

    def usable(self, c: int) -> bool:
        """Can a sequence resume at length c (the next position computed is c) from this snapshot?
        A query at c sees keys c-window+1 .. c: the sliding layers must still hold c-window+1 .. c-1."""
        return 0 < c <= len(self.tokens) and self.ring_start <= max(0, c - self.window + 1)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.values())


class KVCache:
    """One layer store per decoder layer for a batch of rows: RingKV (sliding) or PagedKV (full, one
    BlockTable for all of them)."""

    def __init__(self, config: ModelConfig, batch: int = 1, capacity: int = 256,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", tail: int = 0,
                 kv_dtype: str = "float", block: int = BLOCK_TOKENS, blocks: int | None = None):
        """capacity: tokens per row the pool starts with (it grows); blocks: a fixed pool of that many
        blocks of `block` tokens instead, never grown (see fix_pool)."""
        device = torch.device(device)
        if tail < 0:
            raise ValueError(f"tail: must be at least 0, got {tail}")
        self.window = config.sliding_window
        self.tail = tail
        self.kv_dtype = kv_dtype
        start = blocks if blocks is not None else max(1, batch * -(-max(1, capacity) // block))
        self.table = BlockTable(batch, block, start, fixed=blocks is not None)
        self.layers = []
        for i in range(config.num_hidden_layers):
            kv, d, keys = config.kv_heads_of(i), config.head_dim_of(i), not config.k_eq_v(i)
            if config.is_sliding(i):
                self.layers.append(RingKV(batch, kv, d, ring_slots(config.sliding_window, tail), keys, dtype, device,
                                          kv_dtype, window=config.sliding_window))
            else:
                self.layers.append(PagedKV(self.table, kv, d, keys, dtype, device, kv_dtype))
        self.batch = batch

    def fix_pool(self, blocks: int) -> None:
        """The full layers get a pool of exactly `blocks` blocks, allocated now and never grown (rows empty)."""
        self.table.resize(blocks, fixed=True)
        for layer in self.layers:
            if not layer.ring:
                layer._sync()

    def ring_nbytes(self) -> int:
        """Bytes of the sliding rings of all rows (fixed)."""
        return sum(layer.nbytes() for layer in self.layers if layer.ring)

    def pool_bytes_per_token(self) -> int:
        """Bytes one token takes in the full layers' pools, all of them together."""
        return sum(layer.bytes_per_token() for layer in self.layers if not layer.ring)

    def view(self, rows) -> "CacheView":
        """The cache over `rows` (a list of row numbers, in batch order), for one model call."""
        rows = list(rows)
        if rows == list(range(rows[0], rows[0] + len(rows))):
            index = slice(rows[0], rows[0] + len(rows))  # contiguous: views, no copies
        else:
            index = torch.tensor(rows, dtype=torch.long, device=self.layers[0].v.device)
        return CacheView([RowsView(layer, index) for layer in self.layers])

    def clear(self, row: int) -> None:
        for layer in self.layers:
            layer.clear(row)

    def length(self, row: int) -> int:
        """Positions row `row` holds (0 .. length-1), as the full layers count them."""
        return self.table.lengths[row]

    def truncate(self, row: int, length: int) -> None:
        """Row `row` forgets positions >= length, so the sequence continues at `length` (speculative
        decoding's rollback). ValueError if a sliding ring no longer holds the window before `length`
        (a rollback further than its tail: the slots it keeps beside the window)."""
        if length < 0:
            raise ValueError(f"truncate: length must be at least 0, got {length}")
        need = max(0, length - self.window + 1)
        for layer in self.layers:
            first = layer.earliest(row) if layer.ring else None
            if first is not None and 0 < length and first > need:
                raise ValueError(f"truncate: row {row} cannot go back to {length} tokens: its sliding layers "
                                 f"start at position {first} (their tail keeps {layer.capacity - self.window} slots "
                                 f"before the window)")
        for layer in self.layers:
            layer.truncate(row, length)

    def keys_values(self, layer: int, row: int, n: int):
        """Row `row`'s K and V of layer `layer` for positions below n, as stored: (k, v, pos) with k, v
        [KV heads, m, head_dim] in the attention dtype (int8 dequantised) and pos [m] ascending; sliding
        layers give only what their ring holds. K is rotated; on K=V layers it is None (the keys are
        the values times k_norm's weight, then RoPE: Attention.keys_values rebuilds them)."""
        return self.layers[layer].keys_values(row, n)

    def ring_snapshot(self, row: int, length: int) -> list[dict[str, torch.Tensor] | None]:
        """Copies of what row `row`'s sliding layers hold below `length` (None for full layers), for
        Snapshot.with_earlier_rings."""
        return [layer.snapshot(row, length) if layer.ring else None for layer in self.layers]

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
        """Bytes allocated: the rings of every row and the full layers' pools."""
        return sum(layer.nbytes() for layer in self.layers)


class CacheView:
    """What the model reads: one entry per layer with update(k, v, pos)."""

    def __init__(self, layers: list[RowsView]):
        self.layers = layers
