"""The place of a KV-shared layer (Gemma 4 E2B/E4B) in a cache: it stores nothing of its own.

A KV-shared layer attends over the KV of an earlier layer of its type (ModelConfig.kv_source_layer),
as that layer left it in the same model call (the decoder hands it those pieces). In the cache it has
no memory, so the KV budget, snapshots (prefix reuse, prompt-cache files) and rollbacks pass it by;
reading its keys and values (keys_values, for an assistant drafter) reads its source's.
"""

from __future__ import annotations

import torch


class SharedKV:
    ring = False  # not a ring of its own (nor a pool): nothing to size, snapshot or truncate
    shared = True

    def __init__(self, source):
        self.source = source

    def update(self, k, v, pos, rows=None, chunk=None):
        raise RuntimeError("a KV-shared layer stores no KV: the decoder hands it its source layer's")

    def keys_values(self, row: int, n: int):
        return self.source.keys_values(row, n)

    def clear(self, row: int) -> None:
        pass

    def truncate(self, row: int, length: int) -> None:
        pass

    def snapshot(self, row: int, length: int) -> dict[str, torch.Tensor]:
        return {}

    def restore(self, row: int, snap: dict[str, torch.Tensor], upto: int) -> None:
        pass

    def _sync(self) -> None:
        pass

    def nbytes(self) -> int:
        return 0
