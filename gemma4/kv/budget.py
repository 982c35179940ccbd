"""One KV memory budget for every running sequence: it sizes the cache, and admission keeps within it.

What the cache allocates is the budget: the sliding layers' rings of every row (fixed: a ring is
bounded by the window) and, with the rest, the full layers' block pool (paged.py), fixed at
`blocks` blocks. A sequence needs pool blocks for every position it may reach (prompt + max_tokens,
rounded up to whole blocks); the scheduler reserves them on admission and gives them back when the
sequence leaves, so a running sequence never finds the pool full. A request that does not fit waits.
"""

from __future__ import annotations

import re

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_bytes(text: str | int) -> int:
    """'8GiB', '512MiB', '2G', '1000000' -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (use e.g. 8GiB, 512MiB, 2G)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


class KVBudget:
    def __init__(self, total_bytes: int, cache):
        """cache: the KVCache whose rows the sequences use (its layers give the sizes); the caller fixes
        its pool at `blocks` (cache.fix_pool)."""
        self.budget = total_bytes
        self.block = cache.table.block
        self.per_token = cache.pool_bytes_per_token()  # full layers, bytes per token of a row
        self.fixed = cache.ring_nbytes()  # every row's sliding rings
        block_bytes = self.block * self.per_token
        self.blocks = (total_bytes - self.fixed) // block_bytes if block_bytes else 1
        if self.blocks < 1:
            raise ValueError(f"kv budget: {total_bytes / 2**20:.1f} MiB does not hold the sliding windows of "
                             f"{cache.batch} rows ({self.fixed / 2**20:.1f} MiB) and one block of {self.block} "
                             f"tokens ({block_bytes / 2**20:.2f} MiB): raise it or run fewer rows at once")
        self.total = self.blocks * block_bytes  # what admission hands out: the pool
        self.reserved = 0

    def need(self, tokens: int) -> int:
        """Pool bytes a sequence reaching `tokens` positions may take."""
        return -(-tokens // self.block) * self.block * self.per_token

    def fits(self, need: int) -> bool:
        return self.reserved + need <= self.total

    def reserve(self, need: int) -> None:
        self.reserved += need

    def release(self, need: int) -> None:
        self.reserved -= need
