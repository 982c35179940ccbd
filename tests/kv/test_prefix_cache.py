"""Prefix reuse: a prompt resumed from a snapshot taken at a grid point of another prompt's prefill gives
the logits of a fresh prefill of it bit for bit, whatever the reuse point's place relative to the sliding
window and the ring wraps, and whatever else the snapshot's rings held."""

import pytest
import torch

import gemma4
from gemma4.engine import prefill, resume_points
from gemma4.kv import PrefixStore, block_hashes, ring_slots
from gemma4.sampling import SamplingParams
from gemma4.engine import Request, Engine
from collect import Collector
from reference import VOCAB


def _ids(n, seed):
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _snapshots_at(model, tokens, chunk, points, tail):
    """Snapshots of a prefill of `tokens` taken when its chunks end at `points` (as the scheduler takes them)."""
    dec = model.decoder
    cache = dec.new_cache(batch=2, capacity=4, tail=tail)
    view, snaps = cache.view([1]), {}

    def take(start, hidden):
        end = start + hidden.shape[1]
        if end in points:
            snaps[end] = cache.snapshot(1, tokens[:end])

    prefill(dec, view, torch.tensor([tokens]), torch.arange(len(tokens))[None], chunk, on_hidden=take)
    return snaps


def _resume_logits(model, snap, c, ids, chunk, tail):
    dec = model.decoder
    cache = dec.new_cache(batch=1, capacity=8, tail=tail)
    cache.restore(0, snap, c)
    out = []
    prefill(dec, cache, torch.tensor([ids]), torch.arange(len(ids))[None], chunk, start=c,
            on_hidden=lambda _, h: out.append(dec.logits(h)[0]))
    return torch.cat(out)


def test_chunks_end_on_a_grid_and_at_image_ends_whatever_the_start():
    from gemma4.engine.runner import _chunks

    assert list(_chunks(23, 8, None)) == [(0, 8), (8, 16), (16, 23)]
    assert list(_chunks(23, 8, None, start=5)) == [(5, 8), (8, 16), (16, 23)]
    joined = [False] * 22
    joined[6:10] = [True] * 4  # an image over columns 6..10: never cut, the grid resumes after it
    assert list(_chunks(23, 8, joined)) == [(0, 11), (11, 16), (16, 23)]
    joined[12:14] = [True] * 2  # and one over 12..14: a chunk ends where an image does
    assert list(_chunks(23, 8, joined)) == [(0, 11), (11, 15), (15, 16), (16, 23)]
    assert list(_chunks(23, 8, joined, start=11)) == [(11, 15), (15, 16), (16, 23)]
    assert resume_points(23, 8, joined, 2) == [15, 16] and resume_points(17, 8, None, 2) == [8, 16]
    assert resume_points(16, 8, None, 2) == [8]  # the last column is always computed
    assert resume_points(8, 8, None) == []


@pytest.mark.parametrize("name", ["moe_kv", "dense_kv_off"])
@pytest.mark.parametrize("chunk", [3, 5, 16, 70])  # 70: past 64, a chunk joined to the ring's old slots
def test_resume_at_a_grid_point_equals_a_fresh_prefill_bit_for_bit(gemma4_models, name, chunk):
    model = gemma4.load(gemma4_models[name][0])
    w = model.config.sliding_window
    doc = _ids(max(5 * w, 3 * chunk) + 3, 1)  # the ring wraps several times
    grid = resume_points(len(doc) + 1, chunk, None, most=len(doc))
    # reuse points: the first, around a window boundary after wraps, and the end of the document
    points = sorted({grid[0], min(grid, key=lambda c: abs(c - 4 * w)), grid[-1]})
    for tail in (0, w + 1):  # the snapshot's rings hold the window only, or more
        snaps = _snapshots_at(model, doc, chunk, points, tail)
        for c in points:
            question = doc[:c] + _ids(2 * w + 1, c)
            full = model.forward(question, chunk=chunk)[c:]
            for resume_tail in (0, 100):  # rings of the size model.forward's are, and larger
                assert torch.equal(_resume_logits(model, snaps[c], c, question, chunk, resume_tail), full), \
                    (tail, c, resume_tail)


def test_a_snapshot_resumes_at_an_earlier_point_with_its_rings_kept(gemma4_models):
    """The scheduler's entry: the last grid point's snapshot, its rings reaching back to the point before."""
    model = gemma4.load(gemma4_models["moe_kv"][0])
    w = model.config.sliding_window
    chunk = ring_slots(w, 0)  # a chunk as long as the rings: at its end they hold nothing older
    doc = _ids(4 * chunk, 2)
    first, last = resume_points(len(doc), chunk, None, 2)
    dec = model.decoder
    cache = dec.new_cache(batch=1, capacity=4)
    rings, snaps = {}, {}

    def take(a, h):
        rings[a + h.shape[1]] = cache.ring_snapshot(0, a + h.shape[1])
        snaps[a + h.shape[1]] = cache.snapshot(0, doc[:a + h.shape[1]])

    prefill(dec, cache, torch.tensor([doc]), torch.arange(len(doc))[None], chunk, on_hidden=take)
    snap = snaps[last]
    assert not snap.usable(first)  # the rings moved on
    assert not snaps[len(doc)].usable(last) and not cache.snapshot(0, doc[:first]).usable(first)  # hold nothing
    both = snap.with_earlier_rings(rings[first], first)
    assert both.resumes == [first, last] and both.usable(first) and both.usable(last)
    question = doc[:first] + _ids(w, 7)
    assert torch.equal(_resume_logits(model, both, first, question, chunk, 0),
                       model.forward(question, chunk=chunk)[first:])
    with pytest.raises(ValueError, match="cannot resume"):
        dec.new_cache().restore(0, snap, first)


def test_store_reuses_an_entry_at_its_resume_points_only(gemma4_models):
    model = gemma4.load(gemma4_models["moe_kv"][0])
    dec = model.decoder
    store = PrefixStore(max_bytes=10**9, block_tokens=4, min_tokens=1)
    a, b = _ids(40, 3), _ids(40, 4)
    for toks in (a[:32], a[:24] + b[:8], b[:32]):
        cache = dec.new_cache(batch=1, capacity=4)
        prefill(dec, cache, torch.tensor([toks]), torch.arange(len(toks))[None], 8)
        store.add(cache.snapshot(0, toks))
    assert store.lookup(a[:24] + b[:12]).length == 32  # the second entry
    assert store.lookup(a + [5, 6]).length == 32
    assert store.lookup(a[:32]) is None  # the last prompt token is always computed: not at 32
    assert store.lookup(a[:30] + [1]) is None  # shares 30 tokens, but an entry resumes at its end or not at all
    assert store.lookup([7, 7, 7]) is None
    assert block_hashes(a, 4)[:7] == block_hashes(a[:30], 4)[:7]
    # bounded by bytes: adding past the limit evicts the least recently used
    size = store.bytes // 3
    small = PrefixStore(max_bytes=2 * size + size // 2, block_tokens=4, min_tokens=1)
    for toks in (a[:32], b[:32], a[:24] + b[:8]):
        cache = dec.new_cache(batch=1, capacity=4)
        prefill(dec, cache, torch.tensor([toks]), torch.arange(len(toks))[None], 8)
        small.add(cache.snapshot(0, toks))
    assert len(small) == 2 and small.lookup(a + [1]) is None  # `a` itself was evicted


def _run(sched, prompt, n):
    c = Collector()
    sched.submit(Request(prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), c))
    assert c.done.wait(120)
    return c.token_ids


@pytest.mark.parametrize("name", ["moe_kv", "dense_kv"])
def test_scheduler_reuses_a_shared_document(gemma4_models, name):
    model = gemma4.load(gemma4_models[name][0])
    w = model.config.sliding_window
    chunk = 5
    store = PrefixStore(max_bytes=10**8, block_tokens=4, min_tokens=8)
    sched = Engine(model, max_batch=2, prefill_chunk=chunk, prefix_store=store).start()
    try:
        jobs = []
        # documents ending just before, at and just after a window boundary, after the ring wrapped
        # four times; a question within a chunk and one that crosses a grid point
        for d in (4 * w - 1, 4 * w, 4 * w + 1):
            doc = _ids(d, d)
            for q in (1, chunk + 2):
                prompt = doc + _ids(q, 10 + q)
                jobs.append((prompt, _run(sched, prompt, 2 * w + 1)))
        # the next turn of a conversation: the previous prompt + answer + a new message
        prev_prompt, prev_answer = jobs[-1]
        turn = prev_prompt + prev_answer + _ids(3, 99)
        jobs.append((turn, _run(sched, turn, w)))
    finally:
        sched.stop()
    # every second question on a document, and the next turn, resumed from the store: up to the last grid
    # point within the shared tokens
    assert store.hits == sched.stats.prefix_hits == 4
    assert sched.stats.prefix_reused_tokens == sum(d // chunk * chunk for d in (4 * w - 1, 4 * w, 4 * w + 1)) \
        + (len(prev_prompt) - 1) // chunk * chunk
    for prompt, got in jobs:
        n = len(got)
        assert got == model.generate(prompt, max_tokens=n, temperature=0, ignore_eos=True).token_ids


def test_a_resumed_prompts_entry_resumes_where_it_did(gemma4_models):
    """A second question on a document resumes at the document's last grid point; its own entry resumes
    there too, so a third question still does when the first entry has been evicted."""
    model = gemma4.load(gemma4_models["moe_kv"][0])
    w, chunk = model.config.sliding_window, 5
    store = PrefixStore(max_bytes=10**8, block_tokens=4, min_tokens=8)
    sched = Engine(model, max_batch=1, prefill_chunk=chunk, prefix_store=store).start()
    doc = _ids(4 * w + 2, 1)  # 34 tokens: grid points 5 .. 30
    try:
        _run(sched, doc + _ids(3, 2), 2)  # resumes at 30 and 35
        store.max_bytes = store.bytes * 3 // 2  # room for one entry from now on
        _run(sched, doc + _ids(2 * chunk + 1, 3), 2)  # resumed at 30, crosses 35 and 40
        assert len(store) == 1 and sched.stats.prefix_reused_tokens == 30
        (entry, _), = store._entries.values()
        assert len(entry.tokens) == 40 and entry.resumes == [30, 40]  # the second question's, not the first
        third = doc + _ids(4, 4)
        got = _run(sched, third, 3)
    finally:
        sched.stop()
    assert sched.stats.prefix_hits == 2 and sched.stats.prefix_reused_tokens == 60
    assert got == model.generate(third, max_tokens=3, temperature=0, ignore_eos=True).token_ids
