"""One KV memory budget shared by every running sequence, counted in blocks of tokens.

A sequence needs its full layers' KV for every position it will reach (prompt + max_tokens, rounded
up to whole blocks) plus its sliding layers' rings, which are fixed. The scheduler reserves that on
admission and gives it back when the sequence leaves; a request that does not fit waits.
The full layers' storage itself stays contiguous per row (rows of one tensor): the budget bounds
what is admitted, it does not page the tensors.
"""

from __future__ import annotations

import re

BLOCK_TOKENS = 256
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
    def __init__(self, total_bytes: int, cache, block_tokens: int = BLOCK_TOKENS):
        """cache: the KVCache whose rows the sequences use (its layers give the sizes)."""
        if block_tokens < 1:
            raise ValueError("kv budget: block_tokens must be at least 1")
        self.total = total_bytes
        self.block = block_tokens
        self.per_token = 0  # full layers, bytes per token per row
        self.per_row = 0  # sliding rings (and their positions), fixed per row
        for layer in cache.layers:
            size = sum(t[0, :, 0].numel() * t.element_size() for t in layer.data.values())
            size += layer.pos.element_size()
            if layer.ring:
                self.per_row += size * layer.capacity
            else:
                self.per_token += size
        self.reserved = 0

    def need(self, tokens: int) -> int:
        blocks = -(-tokens // self.block)
        return blocks * self.block * self.per_token + self.per_row

    def fits(self, need: int) -> bool:
        return self.reserved + need <= self.total

    def reserve(self, need: int) -> None:
        self.reserved += need

    def release(self, need: int) -> None:
        self.reserved -= need
