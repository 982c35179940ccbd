"""KV memory: what the model's attention layers keep of every row's past, and how much of it there is room for.

    cache.py    KVCache: one store per decoder layer (a sliding layer's ring, RingKV); views over some rows
    paged.py    a full layer's block pool shared by all rows, one block table for all full layers (PagedKV)
    codec.py    how K and V are stored: as they come or int8 with group scales
    budget.py   one byte budget for every running sequence: sizes the pool, admission keeps within it
    prefix.py   the prefix store: snapshots found by block hashes
    files.py    prompt-cache files: a snapshot on disk

files.py is not imported here: it runs the engine's prefill (which reads this package), so callers import
gemma4.kv.files themselves.
"""

from .budget import KVBudget, parse_bytes
from .cache import CacheView, KVCache, RingKV, RowsView, Snapshot, ring_slots
from .codec import KV_DTYPES, Codec, check_kv_dtype
from .paged import BLOCK_TOKENS, BlockTable, CacheFull, PagedKV
from .prefix import Hit, PrefixStore, block_hashes, common_prefix, prompt_key

__all__ = ["KV_DTYPES", "BLOCK_TOKENS", "BlockTable", "CacheFull", "CacheView", "Codec", "Hit", "KVBudget",
           "KVCache", "PagedKV", "PrefixStore", "RingKV", "RowsView", "Snapshot", "block_hashes", "check_kv_dtype",
           "common_prefix", "parse_bytes", "prompt_key", "ring_slots"]
