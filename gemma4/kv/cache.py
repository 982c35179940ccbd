"""KVCache: the KV memory of a batch of rows, one layer store per decoder layer.

- Sliding layers keep a ring per row (ring.py): the window and a tail, whatever the row's length.
- Full layers keep their KV in a block pool shared by all rows (paged.py): memory follows what the
  rows hold, block by block, not rows x the longest row; with a fixed number of blocks (the KV budget,
  budget.py) it never grows.
- `kv_dtype="int8"` stores K and V as int8 with one float32 scale per group of 32 values (codec.py).
- KV-shared layers (E2B/E4B) store nothing: a SharedKV stands in their place, reading its source's.

Rows are independent: a row holds one sequence at its own positions (a batch of prompts of different
lengths is left padded, pads at position -1). `KVCache.view(rows)` hands the model a cache over some
rows only, so sequences can be prefilled alone and decoded together, and a freed row (`clear(row)`) is
taken by the next request. `snapshot(row, tokens)` copies a row's first positions out (what a sliding
ring still holds of them) as a Snapshot (prefix.py) and `restore(row, snap, upto)` puts them back into a
row, so a later request sharing the prefix skips its prefill. `truncate(row, length)` forgets positions
>= length (speculative decoding's rollback); `keys_values(layer, row, n)` reads a row's stored K and V
below position n.
"""

from __future__ import annotations

import torch

from ..config.text import ModelConfig
from .codec import kv_bytes_per_token
from .paged import BLOCK_TOKENS, BlockTable, PagedKV
from .prefix import Snapshot
from .ring import RingKV, ring_slots
from .shared import SharedKV


class RowsView:
    """One layer of the cache seen through some of its rows: what attention calls update() on."""

    def __init__(self, layer, rows):
        self.layer, self.rows = layer, rows

    def update(self, k, v, pos, chunk: int | None = None):
        return self.layer.update(k, v, pos, self.rows, chunk)


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
        self.config = config
        self.window = config.sliding_window
        self.tail = tail
        self.kv_dtype = kv_dtype
        self.dtype = dtype
        start = blocks if blocks is not None else max(1, batch * -(-max(1, capacity) // block))
        self.table = BlockTable(batch, block, start, fixed=blocks is not None)
        self.layers = []
        for i in range(config.num_hidden_layers):
            kv, d, keys = config.kv_heads_of(i), config.head_dim_of(i), not config.k_eq_v(i)
            if config.kv_shared(i):
                self.layers.append(SharedKV(self.layers[config.kv_source_layer(i)]))
            elif config.is_sliding(i):
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
        return sum(kv_bytes_per_token(self.config, i, self.kv_dtype, self.dtype)
                   for i, layer in enumerate(self.layers) if not layer.ring)

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
