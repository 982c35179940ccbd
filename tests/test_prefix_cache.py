"""Prefix reuse: a sequence resumed from a snapshot of another one's KV gives the logits of a plain
full forward, whatever the reuse point's place relative to the sliding window and the ring wraps."""

import pytest
import torch

import gemma4
from gemma4.cache import Snapshot
from gemma4.engine import prefill
from gemma4.prefix_cache import PrefixStore, block_hashes
from gemma4.sampling import SamplingParams
from gemma4.scheduler import Request, Scheduler
from collect import Collector
from reference import VOCAB

# float32 everywhere: the same sums in a different chunking differ by rounding only (~1e-6 relative);
# logits are soft-capped at 30, so 1e-4 absolute is far below any real error (a wrong key moves them ~1).
TOL = 1e-4


def _ids(n, seed):
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _resume_logits(model, snap: Snapshot, c: int, ids: list[int], chunk: int, tail: int) -> torch.Tensor:
    dec = model.decoder
    cache = dec.new_cache(batch=1, capacity=8, tail=tail)
    cache.restore(0, snap, c)
    out = []
    prefill(dec, cache, torch.tensor([ids[c:]]), torch.arange(c, len(ids))[None], chunk,
            on_hidden=lambda _, h: out.append(dec.logits(h)[0]))
    return torch.cat(out)


@pytest.mark.parametrize("name", ["moe_kv", "dense_kv_off"])
@pytest.mark.parametrize("chunk", [3, 5, 64])
def test_resume_from_snapshot_equals_full_forward(gemma4_models, name, chunk):
    model = gemma4.load(gemma4_models[name][0])
    w = model.config.sliding_window
    tail = w + 1
    doc = _ids(5 * w + 3, 1)  # the ring wraps several times
    dec = model.decoder
    cache = dec.new_cache(batch=2, capacity=4, tail=tail)
    prefill(dec, cache.view([1]), torch.tensor([doc]), torch.arange(len(doc))[None], chunk)
    snap = cache.snapshot(1, doc)
    # reuse points: before, at and after window boundaries, far back in the tail, and the very end
    for c in sorted({len(doc), len(doc) - 1, 4 * w, 4 * w + 1, 4 * w - 1, len(doc) - tail - 1 + w - 1}):
        if not snap.usable(c):
            continue
        question = doc[:c] + _ids(2 * w + 1, c)
        resumed = _resume_logits(model, snap, c, question, chunk, tail)
        full = model.forward(question)[c:]
        assert (resumed - full).abs().max().item() <= TOL, c


def test_snapshot_usable_only_when_the_window_before_is_held(gemma4_models):
    model = gemma4.load(gemma4_models["moe_kv"][0])
    w = model.config.sliding_window
    tail = 4
    doc = _ids(6 * w, 2)
    cache = model.decoder.new_cache(batch=1, capacity=4, tail=tail)
    prefill(model.decoder, cache, torch.tensor([doc]), torch.arange(len(doc))[None], 7)
    snap = cache.snapshot(0, doc)
    assert snap.ring_start == len(doc) - w - tail
    first = len(doc) - tail - 1  # the window before c starts at c - w + 1 == ring_start
    assert snap.usable(first) and not snap.usable(first - 1) and snap.usable(len(doc))
    with pytest.raises(ValueError, match="cannot resume"):
        model.decoder.new_cache(tail=tail).restore(0, snap, first - 1)
    # a short sequence is held whole: usable at any length
    short = model.decoder.new_cache(batch=1, capacity=4, tail=tail)
    prefill(model.decoder, short, torch.tensor([doc[:w]]), torch.arange(w)[None])
    s = short.snapshot(0, doc[:w])
    assert all(s.usable(c) for c in range(1, w + 1))


def test_store_finds_the_longest_usable_prefix(gemma4_models):
    model = gemma4.load(gemma4_models["moe_kv"][0])
    dec = model.decoder
    store = PrefixStore(max_bytes=10**9, block_tokens=4, min_tokens=1)
    a, b = _ids(40, 3), _ids(40, 4)
    for toks in (a, a[:30] + b[:10], b):
        cache = dec.new_cache(batch=1, capacity=4, tail=64)  # tail: every position held
        prefill(dec, cache, torch.tensor([toks]), torch.arange(len(toks))[None])
        store.add(cache.snapshot(0, toks))
    assert store.lookup(a[:30] + b[:12]).length == 40 - 10 + 10  # the second entry, whole
    assert store.lookup(a + [5, 6]).length == 40
    assert store.lookup(a).length == 39  # the last prompt token is always computed
    assert store.lookup(a[:13] + [1]).length == 13  # shares 3 whole blocks and one more token
    assert store.lookup([7, 7, 7]) is None
    assert block_hashes(a, 4)[:7] == block_hashes(a[:30], 4)[:7]
    # bounded by bytes: adding past the limit evicts the least recently used
    size = store.bytes // 3
    small = PrefixStore(max_bytes=2 * size + size // 2, block_tokens=4, min_tokens=1)
    for toks in (a, b, a[:30] + b[:10]):
        cache = dec.new_cache(batch=1, capacity=4, tail=64)
        prefill(dec, cache, torch.tensor([toks]), torch.arange(len(toks))[None])
        small.add(cache.snapshot(0, toks))
    assert len(small) == 2 and small.lookup(a + [1]).length == 30  # `a` itself was evicted


def _run(sched, prompt, n):
    c = Collector()
    sched.submit(Request(prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), c))
    assert c.done.wait(120)
    return c.token_ids


@pytest.mark.parametrize("name", ["moe_kv", "dense_kv"])
def test_scheduler_reuses_a_shared_document(gemma4_models, name):
    model = gemma4.load(gemma4_models[name][0])
    w = model.config.sliding_window
    store = PrefixStore(max_bytes=10**8, block_tokens=4, min_tokens=8)
    sched = Scheduler(model, max_batch=2, prefill_chunk=5, prefix_store=store, ring_tail=2 * w).start()
    try:
        jobs = []
        # documents ending just before, at and just after a window boundary, after the ring wrapped
        # four times; questions short and longer than the window
        for d in (4 * w - 1, 4 * w, 4 * w + 1):
            doc = _ids(d, d)
            for q in (1, w + 1):
                prompt = doc + _ids(q, 10 + q)
                jobs.append((prompt, _run(sched, prompt, 2 * w + 1)))
        # the next turn of a conversation: the previous prompt + answer + a new message
        prev_prompt, prev_answer = jobs[-1]
        turn = prev_prompt + prev_answer + _ids(3, 99)
        jobs.append((turn, _run(sched, turn, w)))
    finally:
        sched.stop()
    # every second question on a document, and the next turn, resumed from the store
    assert store.hits == sched.stats.prefix_hits == 4 and sched.stats.prefix_reused_tokens >= 3 * (4 * w - 1)
    for prompt, got in jobs:
        n = len(got)
        assert got == model.generate(prompt, max_tokens=n, temperature=0, ignore_eos=True).token_ids
