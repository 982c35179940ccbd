"""Prefill + cached decode steps equal one full forward, across the window and after the ring wraps."""

import pytest
import torch

import gemma4
from gemma4.kv import ring_slots
from gemma4.native.ops import ATTENTION_CHUNK
from gemma4.engine import prefill
from reference import VOCAB


@pytest.mark.parametrize("name", ["moe_kv", "dense_kv_off", "dense_kv"])
@pytest.mark.parametrize("prompt_len", [1, 5, 13])
def test_decode_steps_match_full_forward(gemma4_models, name, prompt_len, float_products):
    path, _ = gemma4_models[name]
    model = gemma4.load(path)
    window = model.config.sliding_window
    total = 4 * window + 3  # the ring wraps several times
    ids = torch.randint(3, VOCAB, (total,), generator=torch.Generator().manual_seed(7))
    full = model.forward(ids)

    dec = model.decoder
    cache = dec.new_cache(batch=1, capacity=4)  # small, so full layers must grow
    pos = torch.arange(total)[None]
    h = prefill(dec, cache, ids[None, :prompt_len], pos[:, :prompt_len], chunk=4)
    steps = [dec.logits(h)[0]]
    for t in range(prompt_len, total):
        with torch.inference_mode():
            h = dec(ids[None, t:t + 1], pos[:, t:t + 1], cache)[:, -1]
        steps.append(dec.logits(h)[0])
    stepped = torch.stack(steps)
    assert (stepped - full[prompt_len - 1:]).abs().max().item() <= 1e-4


def test_cache_memory_is_bounded(gemma4_models):
    path, _ = gemma4_models["moe_kv"]
    model = gemma4.load(path)
    cfg = model.config
    n = 300  # past the rings' slots
    ids = torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(1))
    cache = model.decoder.new_cache(batch=1, capacity=n)
    prefill(model.decoder, cache, ids[None], torch.arange(n)[None])
    ring = ring_slots(cfg.sliding_window, 0)
    assert ring % ATTENTION_CHUNK == 0 and cfg.sliding_window + ATTENTION_CHUNK - 1 <= ring < n
    for i, layer in enumerate(cache.layers):
        if cfg.is_sliding(i):
            assert layer.v.shape[2] == ring and layer.k.shape[2] == ring
        else:
            assert layer.k is None, "a K=V layer stores one tensor"
            assert layer.v.shape[2] * layer.v.shape[0] >= n


@pytest.mark.parametrize("kv_dtype", ["float", "int8"])
def test_ring_chunk_attends_over_held_slots_only(kv_dtype):
    """A chunk written to a sliding layer's ring is attended together with the slots some row holds: none
    on a fresh prompt (its own tokens alone, not a window of empty slots besides), only the held ones of
    a ring partly filled (a shorter row's empty slots stay where another row holds its own)."""
    from gemma4.kv import RingKV

    g = torch.Generator().manual_seed(4)
    ring = RingKV(2, kv_heads=1, head_dim=8, capacity=6, keys=True, dtype=torch.float32,
                  device=torch.device("cpu"), kv_dtype=kv_dtype)
    k, v = (torch.randn(2, 1, 3, 8, generator=g) for _ in range(2))
    pos = torch.tensor([[0, 1, 2], [-1, 0, 1]])
    (pk, pv, ppos), = ring.update(k, v, pos)
    assert pk is k and pv is v and ppos is pos  # a fresh ring: nothing old joined
    k2, v2 = (torch.randn(2, 1, 2, 8, generator=g) for _ in range(2))
    pos2 = torch.tensor([[3, 4], [2, 3]])
    (pk, pv, ppos), = ring.update(k2, v2, pos2)
    assert ppos.shape == (2, 3 + 2) and ppos[:, 3:].tolist() == pos2.tolist()
    assert sorted(ppos[0, :3].tolist()) == [0, 1, 2] and sorted(ppos[1, :3].tolist()) == [-1, 0, 1]
    stored = ring._read(None)[1]
    for b in range(2):
        for j in range(3):
            if ppos[b, j] >= 0:
                slot = int(ppos[b, j]) % 6
                assert torch.equal(pv[b, :, j], stored[b, :, slot])
    assert torch.equal(pv[:, :, 3:], v2) if kv_dtype == "float" else pv.shape == (2, 1, 5, 8)


def test_ring_chunk_joins_the_slots_its_queries_see_in_position_order():
    """A long chunk is joined to the old slots its queries can see (positions after its first one minus
    the window), each row's in position order, whatever slot order the ring holds them in and whatever
    older positions it still holds: what it attends over depends on positions alone."""
    from gemma4.kv import RingKV

    g = torch.Generator().manual_seed(5)
    ring = RingKV(2, kv_heads=1, head_dim=8, capacity=10, keys=False, dtype=torch.float32,
                  device=torch.device("cpu"), window=4)
    for start in range(0, 13, 1):  # positions 0..12, one at a time: the ring wraps
        v = torch.randn(2, 1, 1, 8, generator=g)
        ring.update(None, v, torch.tensor([[start], [start - 3 if start >= 3 else -1]]))
    stored = {b: {int(p): ring.v[b, :, s].clone() for s, p in enumerate(ring.pos[b].tolist()) if p >= 0}
              for b in range(2)}
    chunk = torch.randn(2, 1, 70, 8, generator=g)  # past 64: the joining path
    pos = torch.stack([torch.arange(13, 83), torch.arange(10, 80)])
    (_, pv, ppos), = ring.update(None, chunk, pos)
    assert ppos[0, :3].tolist() == [10, 11, 12]  # > 13 - 4, ascending (the ring held 3..12, wrapped)
    assert ppos[1, :3].tolist() == [7, 8, 9]
    for b in range(2):
        for j in range(3):
            assert torch.equal(pv[b, :, j], stored[b][int(ppos[b, j])])
    assert torch.equal(pv[:, :, 3:], chunk)


def test_layer_stores_start_zeroed_whatever_the_allocator_held():
    """A new cache's tensors are zeros even where the allocator hands back memory a freed tensor filled."""
    from gemma4.kv.layer import zeros

    for dtype in (torch.float32, torch.bfloat16, torch.int8):
        junk = torch.full((3, 2, 64, 96), 7, dtype=dtype)
        del junk  # its block goes back to the allocator, 7s and all
        z = zeros((3, 2, 64, 96), dtype, "cpu")
        assert z.dtype == dtype and z.shape == (3, 2, 64, 96) and z.is_contiguous()
        assert torch.equal(z, torch.zeros_like(z))
