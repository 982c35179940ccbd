"""The full layers' block pool: rows of different lengths share one pool and still equal plain forwards;
blocks come back on finish and are reused; a KV budget is exactly what the cache allocates, and rows
that together exceed it wait and complete; truncate and keys_values read and roll back a row."""

import pytest
import torch

import gemma4
from gemma4.engine import prefill
from gemma4.kv import CacheFull, KVBudget, KVCache
from gemma4.sampling import SamplingParams
from gemma4.engine import Request, Engine
from collect import Collector
from reference import VOCAB


@pytest.fixture(scope="module")
def model(gemma4_models):
    return gemma4.load(gemma4_models["moe_kv"][0])


def _ids(n, seed):
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def _cache(model, **kw):
    dec = model.decoder
    return KVCache(dec.config, dtype=dec.dtype, device=dec.device, **kw)


# Blocks of 4: a pool that grows, the rows' blocks interleaved (gathered for attention). Blocks of 64: the
# native kernel reads the pool in place at decode, K=V keys rebuilt inside it.
@pytest.mark.parametrize("kv_dtype,block", [("float", 4), ("int8", 4), ("float", 64)])
def test_rows_of_different_lengths_in_one_pool_equal_plain_forwards(model, kv_dtype, block, float_products):
    dec = model.decoder
    lengths, steps = [9, 23, 14], 6
    seqs = [_ids(n + steps, 10 + i) for i, n in enumerate(lengths)]
    cache = _cache(model, batch=3, block=block, capacity=1, kv_dtype=kv_dtype)
    got = [[] for _ in seqs]
    with torch.inference_mode():
        for start in range(0, max(lengths), 5):  # prefill chunks interleaved: the rows' blocks interleave
            for r, n in enumerate(lengths):
                if start < n:
                    end = min(n, start + 5)
                    h = dec(seqs[r][None, start:end], torch.arange(start, end)[None], cache.view([r]))
                    if end == n:
                        got[r].append(dec.logits(h[:, -1])[0])
        for t in range(steps):  # decoded together, each row at its own position
            ids = torch.stack([s[n + t - 1:n + t] for s, n in zip(seqs, lengths)])
            pos = torch.tensor([[n + t - 1] for n in lengths])
            if t == 0:
                continue
            logits = dec.logits(dec(ids, pos, cache.view([0, 1, 2]))[:, -1])
            for r in range(3):
                got[r].append(logits[r])
    tables = cache.table.tables
    assert sorted(b for t in tables for b in t) == list(range(cache.table.used_blocks()))
    assert block > 4 or max(tables[0]) > min(tables[1]), "rows share the pool, their blocks interleaved"
    for r, n in enumerate(lengths):
        plain = model.forward(seqs[r][:n + steps - 1])[n - 1:]
        if kv_dtype == "float":
            assert (torch.stack(got[r]) - plain).abs().max() <= 1e-4  # float32, other summation orders
        else:  # int8 KV: the same tokens' logits within int8 rounding (test_kv_budget bounds its KL)
            assert (torch.stack(got[r]).argmax(-1) == plain.argmax(-1)).float().mean() >= 0.8


def test_blocks_are_freed_and_reused_and_a_fixed_pool_refuses_more(model):
    dec = model.decoder
    cache = _cache(model, batch=2, block=4, blocks=5)
    with torch.inference_mode():
        dec(_ids(10, 1)[None], torch.arange(10)[None], cache.view([0]))  # 3 blocks
        first = list(cache.table.tables[0])
        assert cache.table.used_blocks() == 3
        with pytest.raises(CacheFull):
            dec(_ids(10, 2)[None], torch.arange(10)[None], cache.view([1]))  # 3 more of 2 free
        cache.clear(1)
        cache.clear(0)
        assert cache.table.used_blocks() == 0
        dec(_ids(10, 2)[None], torch.arange(10)[None], cache.view([1]))
        assert sorted(cache.table.tables[1]) == sorted(first)  # the freed blocks, taken again
    assert all(layer.v.shape[0] == 5 for layer in cache.layers if not layer.ring)  # allocated once


def test_budget_is_what_the_cache_allocates_and_rows_over_it_wait(model):
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    probe = KVBudget(10**12, model.decoder.new_cache(batch=3))  # sizes only: nothing allocated
    fixed, block_bytes = probe.fixed, probe.block * probe.per_token
    budget = fixed + 2 * block_bytes + block_bytes // 2  # two rows' blocks: three rows x longest do not fit
    sched = Engine(model, max_batch=3, kv_budget=budget, prefill_chunk=8)
    allocated = sched.cache.nbytes()
    assert allocated <= budget < allocated + block_bytes  # the budget, up to less than one block
    prompts = [_ids(n, 20 + n).tolist() for n in (30, 50, 40)]
    collectors = [Collector() for _ in prompts]
    running = []
    for p, c in zip(prompts, collectors):
        sched.submit(Request(p, params, c))

    def watch(out, c=collectors[0]):
        running.append(sched.running)
        c(out)

    sched.scheduler.waiting[0].emit = watch
    sched.start()
    try:
        assert all(c.done.wait(180) for c in collectors)
    finally:
        sched.stop()
    assert max(running) == 2 and sched.cache.table.used_blocks() == 0 and sched.budget.reserved == 0
    assert sched.cache.nbytes() == allocated  # the pool never grew
    for p, c in zip(prompts, collectors):
        alone = model.generate(p, max_tokens=30, temperature=0, ignore_eos=True)
        assert [o.token_id for o in c.outputs] == alone.token_ids


def test_truncate_rolls_a_row_back(model):
    dec = model.decoder
    w = model.config.sliding_window
    cache = _cache(model, batch=1, block=4, tail=4)
    ring = next(layer.capacity for layer in cache.layers if layer.ring)
    n = ring + 30  # the rings have wrapped
    ids = _ids(n + 10, 5)
    with torch.inference_mode():
        prefill(dec, cache, ids[None, :n], torch.arange(n)[None], chunk=7)
        dec(_ids(3, 6)[None], torch.arange(n, n + 3)[None], cache)  # three tokens then rejected
        cache.truncate(0, n)
        assert cache.length(0) == n
        out = [dec.logits(dec(ids[None, t:t + 1], torch.tensor([[t]]), cache)[:, -1])[0] for t in range(n, n + 10)]
    plain = model.forward(ids, chunk=7)[n:n + 10]
    assert (torch.stack(out) - plain).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="cannot go back"):
        cache.truncate(0, n + 10 - (ring - w) - 3)  # further back than the ring's spare slots


def test_keys_values_are_the_rows_rotated_keys_and_values(model):
    dec = model.decoder
    cfg = model.config
    ids = _ids(25, 8)
    inputs = {}
    hooks = [layer.self_attn.register_forward_hook(lambda m, a, o, i=i: inputs.setdefault(i, a[0]))
             for i, layer in enumerate(dec.layers)]
    cache = _cache(model, batch=2, block=4, tail=2)
    try:
        with torch.inference_mode():
            dec(ids[None], torch.arange(25)[None], cache.view([1]))
    finally:
        for h in hooks:
            h.remove()
    from gemma4.model.layers import apply_rope, rope_cos_sin
    for i, layer in enumerate(dec.layers):
        attn = layer.self_attn
        x = inputs[i][0]
        raw = attn.k_proj(x).view(25, attn.kv_heads, attn.head_dim)
        cos, sin = rope_cos_sin(attn.inv_freq, torch.arange(25), x.dtype)
        k = apply_rope(attn.k_norm(raw)[None], cos[None], sin[None])[0].transpose(0, 1)
        v = attn.v_norm(raw if attn.v_proj is None else attn.v_proj(x).view(25, attn.kv_heads, -1)).transpose(0, 1)
        got_k, got_v, pos = attn.keys_values(cache, i, 1, 20)
        first = 25 - cache.layers[i].capacity if cfg.is_sliding(i) else 0  # a ring holds its last slots' worth
        assert pos.tolist() == list(range(max(0, first), 20))
        assert (got_k - k[:, pos]).abs().max() <= 1e-5 and (got_v - v[:, pos]).abs().max() <= 1e-6
        stored_k, _, _ = cache.keys_values(i, 1, 20)
        assert (stored_k is None) == cfg.k_eq_v(i)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("dtype,kv_dtype", [(torch.float32, "float"), (torch.bfloat16, "float"), (torch.float32, "int8")])
def test_one_token_writes_equal_a_chunk_write(monkeypatch, native, dtype, kv_dtype):
    """Decode writes one token per row slot by slot (one native call, or torch's indexing); the pool ends
    up as one chunked write leaves it, and a position past a row's end (a gap) is refused on that path too."""
    from gemma4.kv import BlockTable, PagedKV
    import gemma4.native

    if not native:
        monkeypatch.setattr(gemma4.native, "_module", False)
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(2, 2, 10, 8, generator=g).to(dtype) for _ in range(2))
    pos = torch.arange(10).repeat(2, 1)
    pos[1, 7:] = -1  # row 1 has 7 tokens; its last three slots are padding

    def layer():
        return PagedKV(BlockTable(rows=3, block=4), kv_heads=2, head_dim=8, keys=True,
                       dtype=dtype, device=torch.device("cpu"), kv_dtype=kv_dtype)

    chunked, stepped = layer(), layer()
    chunked.write(k, v, pos, rows=[2, 0])
    for t in range(10):
        stepped.write(k[:, :, t:t + 1], v[:, :, t:t + 1], pos[:, t:t + 1], rows=[2, 0])
    assert stepped.table.lengths == chunked.table.lengths == [7, 0, 10]
    for row, b in ((2, 0), (0, 1)):
        sk, sv, spos = stepped.keys_values(row, 10)
        ck, cv, cpos = chunked.keys_values(row, 10)
        n = chunked.table.lengths[row]
        assert torch.equal(spos, cpos) and torch.equal(sk, ck) and torch.equal(sv, cv)
        if kv_dtype == "float":
            assert torch.equal(sk, k[b, :, :n]) and torch.equal(sv, v[b, :, :n])
    with pytest.raises(ValueError, match="gap"):
        stepped.write(k[:1, :, :1], v[:1, :, :1], torch.tensor([[12]]), rows=[2])


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("kv_dtype", ["float", "int8"])
def test_one_token_ring_writes_equal_a_chunk_write(monkeypatch, native, kv_dtype):
    """A sliding layer's ring: decode steps written slot by slot hold what one chunk leaves (the last
    `capacity` positions of each row, padding unwritten)."""
    from gemma4.kv import RingKV
    import gemma4.native

    if not native:
        monkeypatch.setattr(gemma4.native, "_module", False)
    g = torch.Generator().manual_seed(1)
    k, v = (torch.randn(2, 2, 11, 8, generator=g) for _ in range(2))
    pos = torch.arange(11).repeat(2, 1)
    pos[0, 8:] = -1

    def ring():
        return RingKV(3, kv_heads=2, head_dim=8, capacity=4, keys=True, dtype=torch.float32,
                      device=torch.device("cpu"), kv_dtype=kv_dtype)

    chunked, stepped = ring(), ring()
    chunked.write(k, v, pos, rows=[2, 1])
    for t in range(11):
        stepped.write(k[:, :, t:t + 1], v[:, :, t:t + 1], pos[:, t:t + 1], rows=[2, 1])
    assert torch.equal(stepped.pos, chunked.pos) and chunked.pos[1].sort().values.tolist() == [7, 8, 9, 10]
    for name in stepped.data:
        assert torch.equal(stepped.data[name], chunked.data[name]), name


def test_put_tokens_copies_rows_converts_dtypes_and_refuses_bad_slots():
    """The native one-token write: same-dtype rows go as bytes, another dtype through torch's copy (float32
    into a bf16 pool), positions into the table; a slot outside the pool is an error, not a stray write."""
    import gemma4.native
    from gemma4.native import ops

    if gemma4.native.compiled() is None:
        pytest.skip("no native kernel")
    g = torch.Generator().manual_seed(2)
    stored = {"k": torch.zeros(3, 2, 5, 8), "v": torch.zeros(3, 2, 5, 8, dtype=torch.bfloat16)}
    new = {"k": torch.randn(2, 2, 3, 8, generator=g)[:, :, 1:2], "v": torch.randn(2, 2, 1, 8, generator=g)}
    table = torch.full((3, 5), -1)
    assert ops.put_tokens(stored, new, [2, -1], [4, 0], table, [9, 7])
    want_k, want_v = torch.zeros_like(stored["k"]), torch.zeros_like(stored["v"])
    want_k[2, :, 4] = new["k"][0, :, 0]
    want_v[2, :, 4] = new["v"][0, :, 0].to(torch.bfloat16)
    assert torch.equal(stored["k"], want_k) and torch.equal(stored["v"], want_v)
    assert table[2, 4] == 9 and (table >= 0).sum() == 1
    with pytest.raises(RuntimeError, match="out of range"):
        ops.put_tokens(stored, new, [3], [0], table, [1])
    with pytest.raises(RuntimeError, match="out of range"):
        ops.put_tokens(stored, new, [0], [5], table, [1])
