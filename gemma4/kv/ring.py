"""A sliding layer's KV: per row a ring of `sliding_window + tail` slots (rounded up to whole chunks of the
attention kernel, ring_slots) with the absolute position of every slot (-1: empty).

Position p lives in slot p % slots, and the attention mask is computed from positions alone. The `tail`
extra slots keep the positions just before the window, so a row can be truncated back by up to `tail`
positions (speculative decoding's rollback). A ring is bounded by the window: its memory is fixed, rows x
slots, whatever the rows hold.
"""

from __future__ import annotations

import torch

from ..native.ops import ATTENTION_CHUNK, put_tokens
from .layer import LayerKV, row_list, rows_of, zeros


def ring_slots(window: int, tail: int) -> int:
    """A ring's slots: the window and at least `tail` more, in whole chunks of the attention kernel, with
    room for a chunk's worth beside the window: each chunk of slots then holds keys of a single run of 64
    positions that a query sees (with less room, the chunk being written would hold the newest keys and
    the oldest the window still sees), so a decode step's arithmetic is the same whatever the tail (a
    speculative run's rings and a plain one's, or a server's, give the same bits)."""
    return -(-(window + max(tail, ATTENTION_CHUNK - 1)) // ATTENTION_CHUNK) * ATTENTION_CHUNK


class RingKV(LayerKV):
    """One sliding layer: per row a ring of `capacity` slots [rows, KV heads, capacity, D], with positions."""

    ring = True

    def __init__(self, batch: int, kv_heads: int, head_dim: int, capacity: int, keys: bool,
                 dtype: torch.dtype, device: torch.device, kv_dtype: str = "float", window: int | None = None):
        self.capacity = capacity
        self.window = capacity if window is None else window  # keys a query sees: p - window + 1 .. p
        super().__init__(head_dim, keys, dtype, kv_dtype)
        self.data = {  # every tensor [B, KV, slots, D or D / group]
            n: zeros((batch, kv_heads, capacity, last), dt, device)
            for name in self.names for n, (last, dt) in self.codec.shapes(name, head_dim).items()}
        self.pos = torch.full((batch, capacity), -1, dtype=torch.long, device=device)

    def _read(self, rows, order: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The rows' stored k (None on K=V layers) and v, decoded, of all slots or, per row, the slots
        order [B, m] names (each stored tensor gathered once)."""
        got = {n: rows_of(t, rows) for n, t in self.data.items()}
        if order is not None:
            got = {n: t.gather(2, order[:, None, :, None].expand(t.shape[0], t.shape[1], -1, t.shape[3]))
                   for n, t in got.items()}
        return self.codec.decode(got, "k"), self.codec.decode(got, "v")

    def write(self, k: torch.Tensor | None, v: torch.Tensor, pos: torch.Tensor, rows=None) -> None:
        """k, v: [B, KV, T, D]; pos: [B, T] absolute positions, -1 for padding (not written).
        rows: the cache row of each batch row (default: batch row b is cache row b)."""
        new = self._encode(k, v)
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
            old_pos = rows_of(self.pos, rows)
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
        return [(*self._read(rows), rows_of(self.pos, rows))]

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
