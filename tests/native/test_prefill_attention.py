"""A prefill chunk's attention on the matrix engine (prefill_attention.cpp): its error against exact attention over
text layers' caches (a ring piece with a window, a K=V layer's paged pool), where it is taken and where not, and
what it costs in logits. Skipped by name where the CPU has no matrix engine (AMX bf16 with AVX-512 BF16)."""

import math

import numpy as np
import pytest
import torch

import gemma4
import gemma4.native
from gemma4.model import attention as attention_mod
from gemma4.model.attention import attention_mask
from gemma4.native import isa, ops
from reference import VOCAB, build_gemma4

EPS32 = float(np.finfo(np.float32).eps)
BF16_UNIT = 2.0**-8  # bf16 keeps 8 significant bits: rounding to nearest moves a value by at most 2^-8 of it

needs_engine = pytest.mark.skipif(not isa.has(*isa.MATRIX_ENGINE_FLAGS) or gemma4.native.compiled() is None,
                                  reason="this CPU has no matrix engine (AMX bf16 with AVX-512 BF16)")


def _exact(q, k, v, qpos, kpos, window, scale, terms):
    """float64 softmax(q k^T * scale, attention_mask) v and sum_j p_j |v_j|, and each score's worst rounding error."""
    b, h, t, d = q.shape
    g = h // k.shape[1]
    kd, vd = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = q.double() @ kd.transpose(-1, -2) * scale
    allowed = attention_mask(qpos, kpos, window)[:, None]
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    # scores, each off by at most this times scale * sum_i |q_i k_i|: terms 1: q and k rounded to bf16 (a product
    # moves by 2u + u^2 of itself), float32 sums of d terms; terms 3: q and k each hi + lo to within u^2 of
    # themselves and q_lo k_lo (u^2 / 4) left out, 3u^2, float32 sums of 3d terms; and the float32 key rebuild
    rel = 2 * BF16_UNIT + BF16_UNIT**2 + (d + 4) * EPS32 if terms == 1 else 3 * BF16_UNIT**2 + (3 * d + 4) * EPS32
    err = rel * scale * (q.double().abs() @ kd.abs().transpose(-1, -2))
    row_err = err.masked_fill(~allowed, 0.0).amax(-1, keepdim=True)
    return p @ vd, p @ vd.abs(), row_err


# The scores off by at most E (the row's largest score error) move each probability by a factor within e^(+-2E);
# each probability and each value is then rounded to bf16 (u each), the exponentials are float32's own (a few eps),
# and P.V sums S terms in float32. So an output element moves by at most
# (e^(2E) (1 + u)^2 (1 + (S + 8) eps32) - 1) * sum_j p_j |v_j|.
def _bound(row_err, weighted, s):
    return ((2 * row_err).exp() * (1 + BF16_UNIT) ** 2 * (1 + (s + 8) * EPS32) - 1) * weighted


@needs_engine
@pytest.mark.parametrize("terms", [1, 3])
def test_ring_piece_with_a_window_is_within_the_bf16_bound(terms):
    """A sliding layer's chunk over its ring piece: stored keys (float32), slots out of position order, empty slots,
    a window, a padding query; 2 query heads per KV head."""
    g = torch.Generator().manual_seed(1)
    b, h, kv, t, d, window = 2, 4, 2, 160, 64, 100
    old = 230
    qpos = torch.arange(old, old + t)[None].repeat(b, 1)
    qpos[1, :3] = -1  # left padding of the second row
    kpos = torch.cat([torch.arange(old - 120, old), qpos[0]])[None].repeat(b, 1)
    kpos[:, 5:9] = -1  # empty slots
    perm = torch.randperm(kpos.shape[1], generator=g)
    kpos = kpos[:, perm]
    s = kpos.shape[1]
    q = 0.25 * torch.randn(b, h, t, d, generator=g)
    k = 0.25 * torch.randn(b, kv, s, d, generator=g)
    v = torch.randn(b, kv, s, d, generator=g)
    got = gemma4.native.compiled().prefill_attention(q, k, v, qpos, kpos, window, None, 1.0, None, None, None, None, terms)
    want, weighted, row_err = _exact(q, k, v, qpos, kpos, window, 1.0, terms)
    assert (got[1, :, :3] == 0).all()  # padding queries see nothing: zeros
    assert ((got.double() - want).abs() <= _bound(row_err, weighted, s)).all()
    assert not torch.equal(got, want.float())  # (the products were rounded: this is not the float path)


@needs_engine
@pytest.mark.parametrize("terms", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_k_eq_v_pool_is_within_the_bf16_bound(dtype, terms):
    """A full K=V layer's chunk over its paged pool read in place through a shuffled block table: keys rebuilt from
    the values (k_norm weight, RoPE on the first r pairs), the causal mask, a row shorter than the other."""
    g = torch.Generator().manual_seed(2)
    b, h, kv, d, block, r = 2, 8, 2, 128, 64, 16
    lengths, t = [700, 520], 300
    nblk = -(-max(lengths) // block)
    pool = torch.randn(2 * nblk + 3, kv, block, d, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(pool.shape[0], generator=g)[:nblk] for _ in range(b)])
    kpos = torch.arange(nblk * block)[None].repeat(b, 1)
    for i, n in enumerate(lengths):
        kpos[i, n:] = -1
    qpos = torch.stack([torch.arange(n - t, n) for n in lengths])
    w = 0.15 + 0.1 * torch.rand(d, generator=g)
    inv_freq = 1.0 / 10000 ** (torch.arange(r).float() / r)
    angle = torch.arange(max(lengths)).float()[:, None] * inv_freq
    cos, sin = angle.cos(), angle.sin()
    q = 0.25 * torch.randn(b, h, t, d, generator=g)
    got = gemma4.native.compiled().prefill_attention(q, None, pool, qpos, kpos, 0, None, 1.0, ids, w, cos, sin, terms)
    # the context as attention sees it: values in position order, keys rebuilt as keys_from_values does
    v = pool[ids].transpose(1, 2).reshape(b, kv, nblk * block, d).float()
    k = v * w
    c, sn = cos[kpos.clamp(min=0)][:, None], sin[kpos.clamp(min=0)][:, None]
    x1, x2 = k[..., :r].clone(), k[..., d // 2:d // 2 + r].clone()
    k[..., :r], k[..., d // 2:d // 2 + r] = x1 * c - x2 * sn, x2 * c + x1 * sn
    want, weighted, row_err = _exact(q, k, v, qpos, kpos, None, 1.0, terms)
    assert ((got.double() - want).abs() <= _bound(row_err, weighted, nblk * block)).all()


@needs_engine
@pytest.mark.parametrize("old", [0, 700])
@pytest.mark.parametrize("threads", [1, 3])
def test_a_causal_chunk_over_its_own_keys_is_within_the_bf16_bound(old, threads):
    """A chunk's queries over the keys before them and their own (causal: the square's upper half masked, multiplied
    only for the queries that see some of each tile of its keys), 4 query heads per KV head as the embedded model's,
    a first chunk and one after 700 older keys; every query's output within the bound, on one thread and on three
    (a first chunk's queries then split in six runs taken out of order)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _causal_chunk(old)
    finally:
        torch.set_num_threads(before)


def _causal_chunk(old: int) -> None:
    g = torch.Generator().manual_seed(3)
    b, h, kv, t, d = 1, 4, 1, 400, 64
    qpos = torch.arange(old, old + t)[None]
    kpos = torch.arange(0, old + t)[None]
    s = kpos.shape[1]
    q = 0.25 * torch.randn(b, h, t, d, generator=g)
    k = 0.25 * torch.randn(b, kv, s, d, generator=g)
    v = torch.randn(b, kv, s, d, generator=g)
    got = gemma4.native.compiled().prefill_attention(q, k, v, qpos, kpos, 0, None, 1.0, None, None, None, None, 3)
    want, weighted, row_err = _exact(q, k, v, qpos, kpos, None, 1.0, 3)
    assert ((got.double() - want).abs() <= _bound(row_err, weighted, s)).all()


@needs_engine
def test_queries_that_see_nothing_get_zeros():
    """A row of the batch all padding (a run of queries with no work) and a padding query beside real ones: zeros
    (the kernel writes them: its output is not zeroed first)."""
    g = torch.Generator().manual_seed(6)
    b, h, kv, t, d = 2, 4, 1, 80, 64
    qpos = torch.arange(t)[None].repeat(b, 1)
    qpos[0, 0] = -1
    qpos[1] = -1
    kpos = torch.arange(t)[None].repeat(b, 1)
    q, k, v = (torch.randn(b, n, t, d, generator=g) for n in (h, kv, kv))
    got = gemma4.native.compiled().prefill_attention(q, k, v, qpos, kpos, 0, None, 1.0, None, None, None, None, 3)
    assert (got[1] == 0).all() and (got[0, :, 0] == 0).all() and (got[0, :, 1:].abs().sum(-1) > 0).all()


@needs_engine
def test_only_prefill_chunks_take_the_engine(monkeypatch):
    """Many queries inside prefill_products() go to the engine; a decode or verify step (few queries), anything
    outside a prefill, and the float reference mode keep their paths."""
    q = torch.zeros(1, 8, 64, 128)
    v = torch.zeros(1, 2, 512, 128)
    assert not ops.engine_attends(q, v)  # outside a prefill
    with ops.prefill_products():
        assert ops.engine_attends(q, v)  # 4 heads x 64 queries per KV head
        assert not ops.engine_attends(q[:, :, :8], v)  # a verify step's few rows
        assert not ops.engine_attends(q, v, torch.zeros(1, 64, 2, dtype=torch.long))  # (from, until) spans
        monkeypatch.setattr(ops, "_activations", "float")
        assert not ops.engine_attends(q, v)


def _kl(p_logits, q_logits):
    lp, lq = torch.log_softmax(p_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


# A tiny K=V MoE model over a prompt crossing its window many times and its chunks (2 x 256 query rows per KV
# head: the engine's rule takes them), against the same run with attention on the float path (every other
# product the same). The bound: the quality bar for the whole model against llama.cpp is a mean KL of
# 0.006; attention's share is held to a sixth of it (measured: ~1e-5 here).
@needs_engine
def test_logits_of_a_long_prompt_stay_close_to_float_attention(tmp_path, monkeypatch):
    build_gemma4(tmp_path, "blocks", seed=4, sliding_window=48)
    model = gemma4.load(tmp_path, progress=False)
    ids = torch.randint(3, VOCAB, (700,), generator=torch.Generator().manual_seed(5)).tolist()
    calls = []
    taken = attention_mod.prefill_attention

    def counted(*args, **kwargs):
        out = taken(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(attention_mod, "prefill_attention", counted)
    engine = model.forward(ids, chunk=256)
    assert sum(calls) == 3 * 3  # every layer of every chunk (700 tokens: 256 + 256 + 188 rows x 2 heads)
    monkeypatch.setattr(ops, "ENGINE_ATTENTION_MIN_ROWS", math.inf)
    plain = model.forward(ids, chunk=256)
    kl = _kl(plain, engine)
    assert 0 < kl.mean() <= 0.001, kl.mean().item()
