"""The full layers' KV: per layer one pool of fixed-size blocks shared by every row, each row a block table.

A row's position p lives in block tables[row][p // block], at offset p % block, in every full layer: the
layers fill in step, so one BlockTable serves them all. A row grows block by block; clear and truncate
hand blocks back, and the next row takes them. A pool of a fixed number of blocks (sized by the KV
budget) never grows: a write that needs more raises CacheFull, which the scheduler's admission rules
out. A pool without a fixed size doubles when it runs out.

A row's positions are contiguous from 0 (slot = position), so a row is its length; a write that would
leave a gap is refused.
"""

from __future__ import annotations

import torch

from ..native.ops import put_tokens
from .layer import LayerKV, row_list, zeros

BLOCK_TOKENS = 256  # tokens of a pool block, and of a block the prefix store hashes
ONE_TOKEN_ROWS = 8  # a write of one token to at most this many rows takes the per-slot path (decode)


class CacheFull(RuntimeError):
    """A fixed pool has no free block left."""


class BlockTable:
    def __init__(self, rows: int, block: int = BLOCK_TOKENS, blocks: int = 1, fixed: bool = False):
        if block < 1 or blocks < 1:
            raise ValueError(f"kv pool: block ({block}) and blocks ({blocks}) must be at least 1")
        self.block = block
        self.fixed = fixed
        self.num_blocks = blocks
        self.free = list(range(blocks - 1, -1, -1))  # pop() takes the lowest
        self.tables: list[list[int]] = [[] for _ in range(rows)]
        self.lengths = [0] * rows

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block)

    def used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def resize(self, blocks: int, fixed: bool) -> None:
        """A new pool of `blocks` blocks (every row must be empty)."""
        if any(self.tables):
            raise RuntimeError("kv pool: cannot resize while rows hold blocks")
        self.__init__(len(self.tables), self.block, blocks, fixed)

    def grow_to(self, row: int, length: int) -> None:
        """Row `row` holds positions [0, length) (the blocks for them allocated)."""
        if length <= self.lengths[row]:
            return
        need = self.blocks_for(length) - len(self.tables[row])
        if need > len(self.free):
            if self.fixed:
                raise CacheFull(f"KV pool full: row {row} needs {need} more blocks of {self.block} tokens, "
                                f"{len(self.free)} of {self.num_blocks} are free")
            grow = max(self.num_blocks, need - len(self.free))
            self.free[:0] = range(self.num_blocks + grow - 1, self.num_blocks - 1, -1)
            self.num_blocks += grow
        self.tables[row].extend(self.free.pop() for _ in range(max(0, need)))
        self.lengths[row] = length

    def truncate(self, row: int, length: int) -> None:
        """Row `row` forgets positions >= length; whole blocks past it go back to the pool."""
        length = max(0, min(length, self.lengths[row]))
        self.lengths[row] = length
        keep = self.blocks_for(length)
        freed = self.tables[row][keep:]
        del self.tables[row][keep:]
        self.free.extend(reversed(freed))

    def index(self, rows: list[int], device) -> torch.Tensor:
        """[R, most blocks of a row] block ids (shorter rows padded with block 0, masked by length)."""
        width = max(1, max(len(self.tables[r]) for r in rows))
        return torch.tensor([self.tables[r] + [0] * (width - len(self.tables[r])) for r in rows],
                            dtype=torch.long, device=device)


class PagedKV(LayerKV):
    """One full layer: pool tensors [blocks, KV heads, block, D] (int8: plus scales) over a BlockTable."""

    ring = False

    def __init__(self, table: BlockTable, kv_heads: int, head_dim: int, keys: bool, dtype: torch.dtype,
                 device: torch.device, kv_dtype: str = "float"):
        super().__init__(head_dim, keys, dtype, kv_dtype)
        self.table = table
        self.kv_heads, self.head_dim, self.device = kv_heads, head_dim, device
        self._allocate(table.num_blocks)

    def _allocate(self, blocks: int) -> None:
        self.data = {n: zeros((blocks, self.kv_heads, self.table.block, last), dt, self.device)
                     for name in self.names for n, (last, dt) in self.codec.shapes(name, self.head_dim).items()}

    def _sync(self) -> None:
        """Follow the table's pool size (it grew, or was resized while empty)."""
        have = self.data["v"].shape[0]
        want = self.table.num_blocks
        if want == have:
            return
        if want < have or self.table.used_blocks() == 0:
            self._allocate(want)
            return
        for n, t in self.data.items():
            extra = zeros((want - have, *t.shape[1:]), t.dtype, t.device)
            self.data[n] = torch.cat([t, extra])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.data.values())

    # ---- writing ------------------------------------------------------------------------------
    def _put(self, rows: list[int], pos: torch.Tensor, stored: dict[str, torch.Tensor]) -> None:
        """Stored tensors [B, KV, T, X] at positions pos [B, T] (-1: not written) of cache rows `rows`."""
        if pos.shape[1] == 1 and len(rows) <= ONE_TOKEN_ROWS:
            self._put_one(rows, pos[:, 0].tolist(), stored)
            return
        keep = pos >= 0
        for b, r in enumerate(rows):
            valid = pos[b][keep[b]]
            if valid.numel() == 0:
                continue
            self._reserve(r, int(valid.min()), int(valid.max()) + 1)
        self._sync()
        b_idx, t_idx = keep.nonzero(as_tuple=True)
        p = pos[b_idx, t_idx]
        blocks = self.table.index(rows, pos.device)[b_idx, p // self.table.block]
        offsets = p % self.table.block
        for n, x in stored.items():
            self.data[n][blocks, :, offsets] = x[b_idx, :, t_idx].to(self.data[n].dtype)

    def _reserve(self, r: int, lo: int, hi: int) -> None:
        """Row r is about to hold positions [lo, hi): refuse a gap after its end, allocate the blocks."""
        if lo > self.table.lengths[r]:
            raise ValueError(f"KV cache row {r}: position {lo} written after only {self.table.lengths[r]} "
                             f"positions (a gap)")
        self.table.grow_to(r, hi)

    def _put_one(self, rows: list[int], pos: list[int], stored: dict[str, torch.Tensor]) -> None:
        """_put of one token per row (decode): a slot write per row and tensor, no index tensors."""
        table = self.table
        for r, p in zip(rows, pos):
            if p >= 0:
                self._reserve(r, p, p + 1)
        self._sync()
        i0 = [table.tables[r][p // table.block] if p >= 0 else -1 for r, p in zip(rows, pos)]
        if put_tokens(self.data, stored, i0, [p % table.block for p in pos]):
            return
        for b, (r, p) in enumerate(zip(rows, pos)):
            if p >= 0:
                block, offset = table.tables[r][p // table.block], p % table.block
                for n, x in stored.items():
                    self.data[n][block, :, offset] = x[b, :, 0]

    def write(self, k: torch.Tensor | None, v: torch.Tensor, pos: torch.Tensor, rows=None) -> None:
        """k, v: [B, KV, T, D]; pos: [B, T] absolute positions, -1 for padding (not written)."""
        stored = self._encode(k, v)
        self._put(row_list(rows, pos.shape[0]), pos, stored)

    def update(self, k: torch.Tensor | None, v: torch.Tensor, pos: torch.Tensor, rows=None, chunk: int | None = None):
        """Store a chunk, then the rows' whole KV as pieces of about `chunk` slots (whole blocks)."""
        self.write(k, v, pos, rows)
        return _Pieces(self, row_list(rows, pos.shape[0]), chunk, pos.device)

    # ---- reading ------------------------------------------------------------------------------
    def gather(self, blocks: torch.Tensor) -> dict[str, torch.Tensor]:
        """blocks [R, n] ids -> stored tensors [R, KV, n * block, X] in position order."""
        out = {}
        for name, t in self.data.items():
            g = t[blocks]  # [R, n, KV, block, X]
            out[name] = g.transpose(1, 2).reshape(g.shape[0], g.shape[2], -1, g.shape[-1])
        return out

    def _row(self, row: int, n: int) -> dict[str, torch.Tensor]:
        """Stored tensors [KV, m, X] of row `row`'s positions [0, m), m = min(n, its length)."""
        m = min(n, self.table.lengths[row])
        ids = torch.tensor(self.table.tables[row][:self.table.blocks_for(m)], dtype=torch.long, device=self.device)
        return {name: t[0, :, :m] for name, t in self.gather(ids[None]).items()}

    def keys_values(self, row: int, n: int):
        """(k or None, v, pos) of row `row`'s positions below n, as attention reads them: [KV, m, D], [m]."""
        got = self._row(row, n)
        m = got["v"].shape[1]
        return self.codec.decode(got, "k"), self.codec.decode(got, "v"), torch.arange(m, device=self.device)

    # ---- rows ---------------------------------------------------------------------------------
    def clear(self, row: int) -> None:
        self.table.truncate(row, 0)

    def truncate(self, row: int, length: int) -> None:
        self.table.truncate(row, length)

    def snapshot(self, row: int, length: int) -> dict[str, torch.Tensor]:
        """Copies of row `row`'s positions [0, length): "pos" [n] and one [KV, n, X] tensor per stored name."""
        out = {name: t.clone() for name, t in self._row(row, length).items()}
        out["pos"] = torch.arange(out["v"].shape[1], device=self.device)
        return out

    def restore(self, row: int, snap: dict[str, torch.Tensor], upto: int) -> None:
        """Row `row` becomes the snapshot's positions below `upto` (and nothing else)."""
        self.clear(row)
        keep = snap["pos"] < upto
        pos = snap["pos"][keep].to(self.device)
        if pos.numel():
            self._put([row], pos[None], {n: snap[n][:, keep][None].to(self.device) for n in self.data})


class _Pieces:
    """Rows' positions [0, longest) read lazily, a few blocks at a time: (k, v, kpos), kpos -1 past a row's end."""

    def __init__(self, layer: PagedKV, rows: list[int], chunk: int | None, device):
        self.layer, self.rows, self.device = layer, rows, device
        table = layer.table
        longest = max(table.lengths[r] for r in rows)
        self.blocks = table.blocks_for(longest)
        self.step = self.blocks if chunk is None else max(1, chunk // table.block)

    def paged(self):
        """The whole context as it sits in the pool, for a kernel that reads blocks in place: (k pool or
        None on K=V layers, v pool, block ids [R, n], kpos [R, n * block]); None for int8 pools."""
        layer, table = self.layer, self.layer.table
        if layer.codec.int8:
            return None
        index = table.index(self.rows, self.device)[:, :max(1, self.blocks)]
        return layer.data.get("k"), layer.data["v"], index, self._kpos(0, index.shape[1], self._lengths())

    def _lengths(self) -> torch.Tensor:
        return torch.tensor([self.layer.table.lengths[r] for r in self.rows], device=self.device)

    def _kpos(self, first: int, blocks: int, lengths: torch.Tensor) -> torch.Tensor:
        """[R, blocks * block] positions of blocks first.. of the rows, -1 past each row's end."""
        block = self.layer.table.block
        kpos = torch.arange(first * block, (first + blocks) * block, device=self.device)
        return torch.where(kpos[None] < lengths[:, None], kpos[None], -1)

    def __iter__(self):
        layer = self.layer
        index = layer.table.index(self.rows, self.device)
        lengths = self._lengths()
        for j in range(0, self.blocks, self.step):
            ids = index[:, j:j + self.step]
            got = layer.gather(ids)
            yield layer.codec.decode(got, "k"), layer.codec.decode(got, "v"), self._kpos(j, ids.shape[1], lengths)
