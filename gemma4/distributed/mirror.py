"""Rank 0 drives, the other ranks follow: every model call and KV operation rank 0 makes is sent to them first.

Rank 0 runs the engine as one process does (scheduler, sampling, grammar, drafting: all on rank 0). Its
decoder is a ShardedDecoder holding a Link: a forward sends (cache, rows, token ids, positions, soft-token
embeddings) to the other ranks and then runs its own shard, the ranks meeting in the layers' collectives;
a head call sends the hidden states whose logits are wanted. Its KV caches are MirroredCaches: a cache made,
cleared, truncated, snapshotted or restored on rank 0 is made so on every rank (each holds its own heads'
KV), so prefix reuse and speculative rollback work unchanged. Snapshots are named by handles: each rank keeps
its own part under the same handle, dropped when rank 0's snapshot is collected.

While idle, rank 0 sends a ping every third of the runtime timeout, so that a waiting rank can tell a quiet
rank 0 from a dead one.
"""

from __future__ import annotations

import threading
import time
import weakref

import torch

from ..kv import KVCache
from ..kv.cache import CacheView
from ..kv.prefix import Snapshot
from ..model.decoder import Decoder
from ..native.ops import prefill_products
from . import comm
from .comm import DistributedError


class Link:
    """Rank 0's end of the ranks' conversation: messages in order, one model call at a time."""

    def __init__(self, tensor: bool):
        self.tensor = tensor  # the head is split: its calls involve every rank
        self.lock = threading.RLock()
        self.failed: str | None = None
        self.on_failure: list = []
        self._ids = 0
        self._dropped: list[int] = []
        self._last = time.monotonic()
        self._closed = False
        self._failing = threading.Lock()

    def new_id(self) -> int:
        self._ids += 1
        return self._ids

    def drop(self, handle: int) -> None:
        self._dropped.append(handle)  # told with the next message (list.append: safe from finalizers)

    def send(self, *message) -> None:
        with self.lock:
            self.check()
            drops, self._dropped = self._dropped, []
            try:
                comm.broadcast_message((drops, message))
            except DistributedError as e:
                self.fail(str(e))
                raise
            self._last = time.monotonic()

    def check(self) -> None:
        if self.failed is not None:
            raise DistributedError(self.failed)

    def fail(self, reason: str) -> None:
        """A rank is gone: every later call raises with the reason; on_failure callbacks run once."""
        with self._failing:
            if self.failed is not None:
                return
            self.failed = reason
        for callback in self.on_failure:
            callback(reason)

    def heartbeat(self, every: float) -> None:
        def beat():
            while not self._closed and self.failed is None:
                time.sleep(every / 4)
                if time.monotonic() - self._last < every or not self.lock.acquire(blocking=False):
                    continue
                try:
                    if not self._closed and self.failed is None:
                        self.send("ping")
                except DistributedError:
                    return
                finally:
                    self.lock.release()

        threading.Thread(target=beat, name="gemma4-rank-heartbeat", daemon=True).start()

    def close(self) -> None:
        """Tell the other ranks to stop (they exit)."""
        with self.lock:
            if not self._closed and self.failed is None:
                try:
                    self.send("stop")
                except DistributedError:
                    pass
            self._closed = True


def _cpu(t):
    return None if t is None else t.cpu()


class ShardedDecoder(Decoder):
    """A Decoder holding one rank's shard (distributed.layers): `kv_config` shapes its KV (its heads);
    `link` is set on rank 0 only."""

    kv_config = None
    link: Link | None = None
    _closer = None

    def close(self) -> None:
        """Rank 0: stop the other ranks and leave the group (a later load may form another); once."""
        closer, self._closer = self._closer, None
        if closer is not None:
            closer()

    def local_cache(self, batch: int = 1, capacity: int = 256, tail: int = 0, kv_dtype: str = "float") -> KVCache:
        return KVCache(self.kv_config, batch, capacity, self.dtype, self.device, tail=tail, kv_dtype=kv_dtype)

    def new_cache(self, batch: int = 1, capacity: int = 256, tail: int = 0, kv_dtype: str = "float") -> KVCache:
        cache = self.local_cache(batch, capacity, tail, kv_dtype)
        if self.link is None:
            return cache
        cid = self.link.new_id()
        self.link.send("cache", cid, dict(batch=batch, capacity=capacity, tail=tail, kv_dtype=kv_dtype))
        cache.__class__ = MirroredCache
        cache._link, cache._cid = self.link, cid
        weakref.finalize(cache, self.link.drop, cid)
        return cache

    def forward(self, ids, positions, cache, embeds=None, embeds_mask=None):
        link = self.link
        if link is None:
            return super().forward(ids, positions, cache, embeds, embeds_mask)
        where = (cache._cid, None) if isinstance(cache, MirroredCache) else getattr(cache, "mirrored", None)
        if where is None:
            raise DistributedError("a sharded model runs only over its own caches (decoder.new_cache)")
        with link.lock:
            link.send("forward", *where, ids.cpu(), positions.cpu(), _cpu(embeds), _cpu(embeds_mask),
                      in_prefill())
            return self._guarded(super().forward, ids, positions, cache, embeds, embeds_mask)

    def logits(self, hidden):
        link = self.link
        if link is None or not link.tensor:  # experts only: the head is whole on rank 0
            return super().logits(hidden)
        with link.lock:
            link.send("logits", hidden.cpu())
            return self._guarded(super().logits, hidden)

    def _guarded(self, call, *args):
        try:
            return call(*args)
        except DistributedError as e:
            self.link.fail(str(e))
            raise


def in_prefill() -> bool:
    from ..native import ops

    return getattr(ops._prefill, "depth", 0) > 0


class _Ref:
    """A handle standing for a rank's own part of a mirrored object in a message."""

    def __init__(self, handle: int):
        self.handle = handle


class MirroredSnapshot(Snapshot):
    def with_earlier_rings(self, earlier, at):
        new = super().with_earlier_rings(earlier, at)
        return _mirrored(self._link, new, "rings", self._handle, _ref(earlier), at, cls=MirroredSnapshot)


class Rings(list):
    """ring_snapshot's list, with a handle."""


def _ref(obj) -> _Ref:
    handle = getattr(obj, "_handle", None)
    if handle is None:
        raise ValueError("this KV was not taken from the sharded model's caches (a prompt-cache file's KV cannot "
                         "be restored across ranks)")
    return _Ref(handle)


def _mirrored(link: Link, obj, *message, cls=None):
    """obj, made on rank 0, made on every rank by `message`, under a new handle."""
    handle = link.new_id()
    if link.failed is None:
        link.send(*message, handle)
    if cls is not None:
        obj.__class__ = cls
    obj._link, obj._handle = link, handle
    weakref.finalize(obj, link.drop, handle)
    return obj


class MirroredCache(KVCache):
    """Rank 0's KV cache: what changes it changes every rank's (see the module's docstring)."""

    def _call(self, name: str, *args):
        if self._link.failed is None:  # after a failure rows are still freed here (failing the requests in flight)
            self._link.send("call", self._cid, name, args, None)

    def view(self, rows) -> CacheView:
        view = super().view(rows)
        view.mirrored = (self._cid, list(rows))
        return view

    def fix_pool(self, blocks):
        super().fix_pool(blocks)
        self._call("fix_pool", blocks)

    def clear(self, row):
        super().clear(row)
        self._call("clear", row)

    def truncate(self, row, length):
        super().truncate(row, length)  # first here: a refused rollback is refused before any rank does it
        self._call("truncate", row, length)

    def restore(self, row, snap, upto):
        ref = _ref(snap)
        super().restore(row, snap, upto)
        self._call("restore", row, ref, upto)

    def snapshot(self, row, tokens):
        return _mirrored(self._link, super().snapshot(row, tokens), "call", self._cid, "snapshot", (row, list(tokens)),
                         cls=MirroredSnapshot)

    def ring_snapshot(self, row, length):
        return _mirrored(self._link, Rings(super().ring_snapshot(row, length)), "call", self._cid, "ring_snapshot",
                         (row, length))

    def keys_values(self, layer, row, n):
        if self._link.tensor:
            raise ValueError("reading a layer's KV (the assistant drafter) needs every head: not under tensor "
                             "parallelism")
        return super().keys_values(layer, row, n)


def follow(decoder: ShardedDecoder) -> None:
    """A worker rank's loop: apply rank 0's messages to this rank's shard until it says stop."""
    caches: dict[int, KVCache] = {}
    objects: dict[int, object] = {}

    def resolve(a):
        return objects[a.handle] if isinstance(a, _Ref) else a

    with torch.inference_mode():
        while True:
            drops, message = comm.broadcast_message()
            for h in drops:
                caches.pop(h, None)
                objects.pop(h, None)
            op, *args = message
            if op == "stop":
                return
            if op == "ping":
                continue
            if op == "cache":
                cid, kwargs = args
                caches[cid] = decoder.local_cache(**kwargs)
            elif op == "call":
                cid, name, call_args, handle = args
                result = getattr(caches[cid], name)(*map(resolve, call_args))
                if handle is not None:
                    objects[handle] = result
            elif op == "rings":
                snap, earlier, at, handle = args
                objects[handle] = objects[snap].with_earlier_rings(resolve(earlier), at)
            elif op == "forward":
                cid, rows, ids, pos, embeds, mask, prefill = args
                device = decoder.device
                soft = {} if mask is None else dict(embeds=embeds.to(device), embeds_mask=mask.to(device))
                view = caches[cid] if rows is None else caches[cid].view(rows)  # None: the whole cache
                if prefill:
                    with prefill_products():
                        Decoder.forward(decoder, ids.to(device), pos.to(device), view, **soft)
                else:
                    Decoder.forward(decoder, ids.to(device), pos.to(device), view, **soft)
            elif op == "logits":
                Decoder.logits(decoder, args[0].to(decoder.device))
            else:
                raise DistributedError(f"unknown message {op!r} from rank 0")
