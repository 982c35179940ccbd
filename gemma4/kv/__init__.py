"""KV memory: what the model's attention layers keep of every row's past, and how much of it there is room for.

    cache.py    KVCache: one layer store per decoder layer for a batch of rows; views over some rows
    layer.py    what a layer store is (LayerKV): the calls both kinds answer
    ring.py     a sliding layer's ring of slots per row (RingKV)
    paged.py    a full layer's block pool shared by all rows, one block table for all full layers (PagedKV)
    codec.py    how K and V are stored: as they come or int8 with group scales; bytes per token
    budget.py   one byte budget for every running sequence: sizes the pool, admission keeps within it
    prefix.py   snapshots of a row's KV, and the prefix store that finds them by block hashes
    files.py    prompt-cache files: a snapshot on disk (the engine's prompt_cache.py prefills through them)
"""

from .budget import KVBudget, parse_bytes
from .cache import CacheView, KVCache, RowsView
from .codec import KV_DTYPES, Codec, check_kv_dtype, kv_bytes_per_token
from .layer import LayerKV
from .paged import BLOCK_TOKENS, BlockTable, CacheFull, PagedKV
from .prefix import Hit, PrefixStore, Snapshot, block_hashes, common_prefix, prompt_key
from .ring import RingKV, ring_slots

__all__ = ["KV_DTYPES", "BLOCK_TOKENS", "BlockTable", "CacheFull", "CacheView", "Codec", "Hit", "KVBudget",
           "KVCache", "LayerKV", "PagedKV", "PrefixStore", "RingKV", "RowsView", "Snapshot", "block_hashes",
           "check_kv_dtype", "common_prefix", "kv_bytes_per_token", "parse_bytes", "prompt_key", "ring_slots"]
