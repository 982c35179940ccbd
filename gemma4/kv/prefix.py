"""Prefix reuse: snapshots of prefills taken at a grid point of their chunks, looked up by prefix.

An entry is a prompt's KV up to its resume points (engine.resume_points: the last chunk ends on the
prefill grid before its last token; the earlier one serves a new question on the same document when
the first question crossed the grid), and it is reused at one of them or not at all: a prompt that
starts with an entry's tokens up to a resume point resumes there and prefills the rest in the chunks a
fresh prefill of it would run, so the logits are the same bits as without reuse, whatever the store
held. (Resuming anywhere else would compute the next positions beside other rows than a fresh prefill
does, and the products' sums round differently at other row counts: enough to flip a greedy near-tie.)

Entries are indexed by chained hashes of whole blocks of token ids (block k's hash covers blocks
0..k), as vLLM's automatic prefix caching does: a prompt's blocks are hashed once and the entries
sharing its first blocks are found without comparing every entry; a candidate's tokens are then
compared whole, so a hash collision can never reuse the wrong KV. The store is bounded by bytes, least
recently used first out.

What an entry holds is a Snapshot: a row's KV for a sequence's first positions (KVCache.snapshot), which
KVCache.restore puts back into a row; a prompt-cache file (files.py) holds one too.
"""

from __future__ import annotations

import collections
import hashlib
from dataclasses import dataclass

import torch

from .paged import BLOCK_TOKENS


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


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class Hit:
    snapshot: Snapshot
    length: int  # tokens of the prompt whose KV the snapshot gives: one of its resume points


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
        """Is there an entry of exactly these tokens?"""
        return any(s.tokens == tokens for s, _ in self._entries.values())

    def add(self, snap: Snapshot) -> None:
        """Keep a snapshot taken at resume points (one not usable at each of them is not kept)."""
        size = snap.nbytes()
        if not self.wants(len(snap.tokens)) or size > self.max_bytes or not all(snap.usable(c) for c in snap.resumes):
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
        """The longest reuse an entry gives: a resume point r of it whose first r tokens begin `prompt`,
        r at most len(prompt) - 1 (the last prompt token is always computed: its logits choose the first
        output token)."""
        limit = len(prompt) - 1
        if limit < 1 or not self._entries:
            return None
        # Entries whose whole blocks begin the prompt's (and those resuming within their first block);
        # compared whole below.
        candidates = {eid for eid, (snap, _) in self._entries.items() if snap.resumes[0] < self.block}
        for h in block_hashes(prompt[:limit], self.block):
            ids = self._index.get(h)
            if not ids:
                break
            candidates |= ids
        best_id, best = None, None
        for eid in candidates:
            snap = self._entries[eid][0]
            shared = common_prefix(prompt, snap.tokens)
            r = max((c for c in snap.resumes if c <= min(shared, limit)), default=0)
            if r > 0 and (best is None or r > best.length):
                best_id, best = eid, Hit(snap, r)
        if best is None:
            return None
        self._entries.move_to_end(best_id)
        self.hits += 1
        self.reused_tokens += best.length
        return best
