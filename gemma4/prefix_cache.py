"""Prefix reuse: snapshots of finished prefills, looked up by the longest shared prefix of token ids.

Entries are indexed by chained hashes of whole blocks of token ids (block k's hash covers blocks
0..k), as vLLM's automatic prefix caching does: a prompt's blocks are hashed once and the entries
sharing its first blocks are found without comparing every entry. The shared length is then
extended token by token past the last whole block and checked against the entry's tokens, so a hash
collision can never reuse the wrong KV. An entry is usable at length c only when its sliding layers
still hold the window before c (cache.Snapshot.usable). The store is bounded by bytes, least
recently used first out.
"""

from __future__ import annotations

import collections
import hashlib
from dataclasses import dataclass

from .cache import Snapshot

BLOCK_TOKENS = 256


def prompt_key(ids: list[int], soft: list | None = None) -> list[int]:
    """A prompt as the prefix store and prompt-cache files match it: token ids, where image soft tokens
    (soft: [(offset, embeddings)]) stand as negative keys derived from their embeddings (a function of
    the pixels), so the same image reuses its KV and another never does."""
    if not soft:
        return list(ids)
    key = list(ids)
    for offset, values in soft:
        digest = hashlib.blake2b(values.detach().float().cpu().contiguous().numpy().tobytes(), digest_size=8)
        base = int.from_bytes(digest.digest(), "little") >> 4
        for j in range(values.shape[0]):
            key[offset + j] = -1 - (base + j) % 2**59  # below every token id
    return key


def block_hashes(tokens: list[int], block: int) -> list[bytes]:
    """Chained hashes of tokens' whole blocks: hash k depends on blocks 0..k."""
    out, h = [], b""
    for start in range(0, len(tokens) - block + 1, block):
        h = hashlib.blake2b(h + bytes(str(tokens[start:start + block]), "ascii"), digest_size=16).digest()
        out.append(h)
    return out


def common_prefix(a: list[int], b: list[int], start: int = 0) -> int:
    n = min(len(a), len(b))
    i = start
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class Hit:
    snapshot: Snapshot
    length: int  # tokens of the prompt whose KV the snapshot gives


class PrefixStore:
    def __init__(self, max_bytes: int, block_tokens: int = BLOCK_TOKENS, min_tokens: int | None = None):
        if max_bytes < 0 or block_tokens < 1:
            raise ValueError("prefix cache: size must be at least 0 and block_tokens at least 1")
        self.max_bytes = max_bytes
        self.block = block_tokens
        self.min_tokens = block_tokens if min_tokens is None else min_tokens  # shorter: not worth a copy
        self._entries: collections.OrderedDict[int, tuple[Snapshot, list[bytes]]] = collections.OrderedDict()
        self._index: dict[bytes, set[int]] = {}
        self._next_id = 0
        self.bytes = 0
        self.hits = 0
        self.reused_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def wants(self, n_tokens: int) -> bool:
        return self.max_bytes > 0 and n_tokens >= self.min_tokens

    def covers(self, tokens: list[int]) -> bool:
        """Is there an entry that already resumes `tokens` at their full length?"""
        return any(s.tokens[:len(tokens)] == tokens and s.usable(len(tokens)) for s, _ in self._entries.values())

    def add(self, snap: Snapshot) -> None:
        size = snap.nbytes()
        if not self.wants(len(snap.tokens)) or size > self.max_bytes:
            return
        for eid, (old, _) in list(self._entries.items()):
            if old.tokens == snap.tokens:  # the same sequence again: keep the newer copy
                self._remove(eid)
        while self.bytes + size > self.max_bytes:
            self._remove(next(iter(self._entries)))
        hashes = block_hashes(snap.tokens, self.block)
        eid, self._next_id = self._next_id, self._next_id + 1
        self._entries[eid] = (snap, hashes)
        for h in hashes:
            self._index.setdefault(h, set()).add(eid)
        self.bytes += size

    def _remove(self, eid: int) -> None:
        snap, hashes = self._entries.pop(eid)
        for h in hashes:
            ids = self._index.get(h)
            if ids is not None:
                ids.discard(eid)
                if not ids:
                    del self._index[h]
        self.bytes -= snap.nbytes()

    def lookup(self, prompt: list[int]) -> Hit | None:
        """The usable entry sharing the longest prefix with `prompt`, at most len(prompt) - 1 tokens
        (the last prompt token is always computed: its logits choose the first output token)."""
        limit = len(prompt) - 1
        if limit < 1 or not self._entries:
            return None
        # Entries whose first k whole blocks equal the prompt's, for the largest k; else all of them.
        candidates, blocks = set(self._entries), 0
        for k, h in enumerate(block_hashes(prompt, self.block)):
            ids = self._index.get(h)
            if not ids:
                break
            candidates, blocks = ids, k + 1
        best: Hit | None = None
        for eid in candidates:
            snap = self._entries[eid][0]
            start = blocks * self.block if snap.tokens[:blocks * self.block] == prompt[:blocks * self.block] else 0
            c = min(common_prefix(prompt, snap.tokens, start), limit)
            if c >= 1 and snap.usable(c) and (best is None or c > best.length):
                best = Hit(snap, c)
        if best is not None:
            for eid, (snap, _) in self._entries.items():
                if snap is best.snapshot:
                    self._entries.move_to_end(eid)
                    break
            self.hits += 1
            self.reused_tokens += best.length
        return best
