"""Attention over the cache in pieces merged by a running softmax equals one plain masked softmax; K=V
layers score values without building whole keys and still equal q . RoPE(v * k_norm weight)."""

import pytest
import torch
from torch.nn import functional as F

import gemma4
from gemma4.engine import prefill
from gemma4.model import attention
from gemma4.model.attention import Attention, attend, attention_mask
from gemma4.model.layers import apply_rope, rope_cos_sin
from reference import VOCAB


def _plain(q, k, v, qpos, kpos, window, sees_until):
    """softmax over all keys at once (SDPA with a boolean mask, heads repeated for GQA)."""
    g = q.shape[1] // k.shape[1]
    mask = attention_mask(qpos, kpos, window, sees_until)[:, None]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                          attn_mask=mask, scale=1.0)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("step", [1, 3, 7, 40])
def test_pieces_merged_equal_one_softmax(window, step):
    g = torch.Generator().manual_seed(0)
    b, h, kv, t, s, d = 2, 6, 2, 4, 23, 8
    q, k, v = (torch.randn(shape, generator=g) * 2 for shape in [(b, h, t, d), (b, kv, s, d), (b, kv, s, d)])
    kpos = torch.arange(s).repeat(b, 1)
    kpos[1, 15:] = -1  # empty slots of a shorter row
    kpos[0, :3] = -1
    qpos = torch.tensor([[19, 20, 21, 22], [11, 12, 13, 14]])
    sees_until = qpos.clone()
    sees_until[0, 1] = 22  # a soft token that sees the rest of its image
    pieces = [(k[:, :, a:a + step], v[:, :, a:a + step], kpos[:, a:a + step]) for a in range(0, s, step)]
    got = attend(q, pieces, qpos, window, sees_until, 1.0)
    want = _plain(q, k, v, qpos, kpos, window, sees_until)
    assert (got - want).abs().max() <= 1e-5  # float32 rounding of two summation orders


def test_pieces_with_scores_far_below_the_maximum_and_hidden_slots_of_any_value():
    """Scores hundreds below their row's maximum (attention scale 1, long contexts) are weighted as e^-87 at
    most, which changes no sum; hidden slots give exactly nothing, whatever they hold."""
    g = torch.Generator().manual_seed(1)
    b, h, kv, t, s, d = 1, 4, 2, 3, 40, 16
    q = torch.randn(b, h, t, d, generator=g) * 6
    k, v = torch.randn(b, kv, s, d, generator=g) * 6, torch.randn(b, kv, s, d, generator=g)
    kpos = torch.arange(s)[None].clone()
    kpos[0, 30:] = -1  # empty slots
    qpos = torch.tensor([[27, 28, 29]])
    pieces = lambda vals: [(k[:, :, a:a + 8], vals[:, :, a:a + 8], kpos[:, a:a + 8]) for a in range(0, s, 8)]  # noqa: E731
    got = attend(q, pieces(v), qpos, None, None, 1.0)
    scores = torch.einsum("bhtd,bhsd->bhts", q.double(), k.repeat_interleave(2, 1).double())
    assert float((scores.amax(-1, keepdim=True) - scores).max()) > 200  # far below e^-87
    want = _plain(q.double(), k.double(), v.double(), qpos, kpos, None, None)
    assert (got.double() - want).abs().max() <= 1e-5  # float32 rounding of the sums
    stale = v.clone()
    stale[:, :, 30:] = 1e30  # what a reused slot may still hold
    assert torch.equal(attend(q, pieces(stale), qpos, None, None, 1.0), got)


@pytest.mark.parametrize("offset,window,causal", [(0, None, True), (0, 80, True), (0, 40, False), (10, None, False)])
def test_a_plain_causal_mask_goes_to_the_fused_kernel_as_is_causal(monkeypatch, offset, window, causal):
    """One piece of T keys at the queries' own positions (a fresh prompt): the mask is the causal one, so
    SDPA gets is_causal (it skips the key blocks above the diagonal) and the result is the masked one's.
    Keys from earlier positions too, or a window shorter than the chunk, keep the explicit mask."""
    g = torch.Generator().manual_seed(3)
    b, h, kv, t, d = 2, 4, 2, 64, 16
    q = torch.randn(b, h, t, d, generator=g)
    k, v = (torch.randn(b, kv, t + offset, d, generator=g) for _ in range(2))
    qpos = torch.arange(offset, offset + t).repeat(b, 1)
    kpos = torch.arange(t + offset).repeat(b, 1)
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append((kwargs.get("is_causal", False), kwargs.get("attn_mask") is None))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    got = attend(q, [(k, v, kpos)], qpos, window, None, 0.25)
    assert calls == [(causal, causal)]
    want = _plain(q * 0.5, k * 0.5, v, qpos, kpos, window, None)  # scale 0.25 as 0.5 on each side
    assert (got - want).abs().max() <= 1e-5


def test_padding_queries_see_nothing_and_give_zeros():
    q, k, v = torch.randn(1, 2, 2, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    out = attend(q, [(k, v, torch.tensor([[0, 1, 2]]))], torch.tensor([[-1, 2]]), None, None, 1.0)
    assert torch.isfinite(out).all() and (out[:, :, 0] == 0).all()


def test_k_eq_v_scores_equal_rotated_keys(gemma4_models):
    cfg = gemma4.load(gemma4_models["moe_kv"][0]).config
    layer = next(i for i in range(cfg.num_hidden_layers) if cfg.k_eq_v(i) and not cfg.is_sliding(i))
    attn = Attention(cfg, layer)
    g = torch.Generator().manual_seed(1)
    attn.k_norm.weight.copy_(0.5 + torch.rand(attn.head_dim, generator=g))
    assert 0 < attn.rotated_pairs() < attn.head_dim // 2, "the test wants partial rotation"
    b, t, s = 2, 3, 9
    q = torch.randn(b, attn.heads, t, attn.head_dim, generator=g)
    v = torch.randn(b, attn.kv_heads, s, attn.head_dim, generator=g)
    kpos = torch.randint(0, 5000, (b, s), generator=g)
    cos, sin = rope_cos_sin(attn.inv_freq, kpos, torch.float32)
    keys = apply_rope((v * attn.k_norm.weight).transpose(1, 2), cos, sin).transpose(1, 2)
    assert (attn.keys_from_values(v, kpos) - keys).abs().max() <= 1e-5
    grp = attn.heads // attn.kv_heads
    want = q.reshape(b, attn.kv_heads, grp * t, -1) @ keys.transpose(-1, -2)
    got = attn.value_scores(q)(v, kpos)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()  # float32, summed in another order


@pytest.mark.parametrize("kv_dtype", ["float", "int8"])
def test_decode_over_one_slot_pieces_equals_whole_pieces(gemma4_models, monkeypatch, kv_dtype):
    model = gemma4.load(gemma4_models["moe_kv"][0])
    dec = model.decoder
    ids = torch.randint(3, VOCAB, (40,), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(40)[None]

    def run():
        cache = dec.new_cache(batch=1, capacity=4, kv_dtype=kv_dtype)
        with torch.inference_mode():
            h = prefill(dec, cache, ids[None, :30], pos[:, :30], chunk=7)
            out = [dec.logits(h)[0]]
            for i in range(30, 40):
                out.append(dec.logits(dec(ids[None, i:i + 1], pos[:, i:i + 1], cache)[:, -1])[0])
        return torch.stack(out)

    whole = run()
    monkeypatch.setattr(attention, "PIECE_ALIGN", 1)
    monkeypatch.setattr(attention, "PIECE_ELEMENTS", 1)
    pieces = run()
    assert (whole - pieces).abs().max() <= 1e-4  # float32: the same sums in another order


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_attention_of_few_queries_equals_one_softmax(dtype):
    """Decode and verify steps (few queries per KV head) run a native kernel over the cache as stored
    (bf16 read directly), its keys in chunks of 64 merged as the pieces are: against one softmax over
    the same widened keys, across several chunks, a window, empty slots, an image span, GQA; and each
    query's result does not depend on the queries beside it (a verify step's row == a decode step)."""
    import gemma4.native
    from gemma4.native import ops

    if gemma4.native.compiled() is None:
        pytest.skip("no AVX2 kernel on this machine")
    g = torch.Generator().manual_seed(3)
    b, h, kv, t, s, d = 2, 8, 2, 3, 300, 256
    q = torch.randn(b, h, t, d, generator=g)
    k, v = (torch.randn(b, kv, s, d, generator=g).to(dtype) for _ in range(2))
    kpos = torch.arange(s).repeat(b, 1)
    kpos[1, 200:] = -1
    kpos[0, 10:20] = -1
    qpos = torch.tensor([[290, 291, 292], [150, 151, 152]])
    sees_until = qpos.clone()
    sees_until[1, 0] = 160
    for window in (None, 100):
        got = ops.attend_small(q, k, v, qpos, kpos, window, sees_until, 0.1)
        assert got is not None
        want = _plain(q * 0.1, k.float(), v.float(), qpos, kpos, window, sees_until)
        assert (got - want).abs().max() <= 1e-5
        alone = torch.cat([ops.attend_small(q[:, :, i:i + 1], k, v, qpos[:, i:i + 1], kpos, window,
                                                sees_until[:, i:i + 1], 0.1) for i in range(t)], dim=2)
        assert torch.equal(got, alone)
    nothing = ops.attend_small(q[:1, :, :1], k[:1], v[:1], torch.tensor([[5]]), torch.full((1, s), -1), None, None, 1.0)
    assert torch.equal(nothing, torch.zeros_like(nothing))
    # many queries (prefill) are left to torch's fused attention
    many = torch.randn(1, h, ops.MAX_SMALL_ATTENTION_ROWS, d)
    assert ops.attend_small(many, k[:1], v[:1], qpos[:1, :1].expand(1, many.shape[2]), kpos[:1], None, None, 1.0) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_attention_reads_a_paged_pool_in_place(dtype):
    """Full layers at decode: the kernel reads the pool's blocks through the rows' block tables (blocks
    in any order, rows of different lengths, slots past a row's end marked -1) exactly as it reads the
    same keys gathered into one contiguous piece."""
    import gemma4.native
    from gemma4.native import ops

    if gemma4.native.compiled() is None:
        pytest.skip("no AVX2 kernel on this machine")
    g = torch.Generator().manual_seed(5)
    blocks, kv, block, d, h = 7, 2, 64, 128, 8
    pool_k, pool_v = (torch.randn(blocks, kv, block, d, generator=g).to(dtype) for _ in range(2))
    table = torch.tensor([[5, 0, 3], [2, 6, 1]])  # row 1 holds 150 positions, row 0 all 192
    lengths = torch.tensor([192, 150])
    s = table.shape[1] * block
    kpos = torch.where(torch.arange(s)[None] < lengths[:, None], torch.arange(s)[None], -1)
    q = torch.randn(2, h, 2, d, generator=g)
    qpos = torch.tensor([[190, 191], [148, 149]])

    def gathered(pool):
        return pool[table].transpose(1, 2).reshape(2, kv, s, d)

    for window in (None, 100):
        got = ops.attend_small(q, pool_k, pool_v, qpos, kpos, window, None, 0.1, blocks=table)
        want = ops.attend_small(q, gathered(pool_k), gathered(pool_v), qpos, kpos, window, None, 0.1)
        assert got is not None and torch.equal(got, want)
        plain = _plain(q * 0.1, gathered(pool_k).float(), gathered(pool_v).float(), qpos, kpos, window, None)
        assert (got - plain).abs().max() <= 1e-5
    # blocks that do not hold whole chunks of the kernel are left to the gathering path
    assert ops.attend_small(q, pool_k[:, :, :32], pool_v[:, :, :32], qpos, kpos[:, :96], None, None, 0.1,
                                blocks=table) is None


def test_native_attention_rebuilds_k_eq_v_keys_from_the_values():
    """K=V layers at decode: the kernel rebuilds each key from its stored value (times the k_norm weight,
    RoPE on the first r pairs from cos/sin tables by position) as keys_from_values does in torch."""
    import gemma4.native
    from gemma4.native import ops

    if gemma4.native.compiled() is None:
        pytest.skip("no AVX2 kernel on this machine")
    g = torch.Generator().manual_seed(8)
    blocks, kv, block, d, h, r = 4, 2, 64, 64, 8, 8
    pool_v = torch.randn(blocks, kv, block, d, generator=g)
    table = torch.tensor([[3, 1]])
    s = 2 * block
    kpos = torch.where(torch.arange(s) < 100, torch.arange(s), -1)[None]
    w = torch.rand(d, generator=g) + 0.5
    angle = torch.arange(200).float()[:, None] * (1.0 / 10000 ** (torch.arange(r).float() / r))
    cos, sin = angle.cos(), angle.sin()
    v = pool_v[table].transpose(1, 2).reshape(1, kv, s, d)
    k = v * w
    c, sn = cos[kpos.clamp(min=0)][:, None], sin[kpos.clamp(min=0)][:, None]
    k1, k2 = k[..., :r].clone(), k[..., d // 2:d // 2 + r].clone()
    k[..., :r], k[..., d // 2:d // 2 + r] = k1 * c - k2 * sn, k2 * c + k1 * sn
    q = torch.randn(1, h, 2, d, generator=g)
    qpos = torch.tensor([[98, 99]])
    got = ops.attend_small(q, None, pool_v, qpos, kpos, None, None, 0.2, blocks=table, rebuild=(w, cos, sin))
    want = _plain(q * 0.2, k, v, qpos, kpos, None, None)
    assert got is not None and (got - want).abs().max() <= 1e-5
    with pytest.raises(ValueError):
        ops.attend_small(q, pool_v, pool_v, qpos, kpos, None, None, 0.2, blocks=table, rebuild=(w, cos, sin))


def test_native_rope_equals_the_torch_ops(monkeypatch):
    """The one-pass RoPE against rope_cos_sin + apply_rope: the same float32 angles, cos/sin from two
    libraries (each within an ulp), at positions up to 256K, with proportional RoPE's zero frequencies."""
    from gemma4.config.common import RopeSpec
    from gemma4.model.layers import rope_inv_freq, rotate
    import gemma4.native

    if gemma4.native.compiled() is None:
        pytest.skip("no AVX2 kernel on this machine")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 4, 64, generator=g)
    positions = torch.tensor([[0, 1, 7], [262000, -1, 4095]])
    for spec in (RopeSpec(theta=10000.0), RopeSpec(theta=1e6, partial_rotary_factor=0.25)):
        inv = rope_inv_freq(spec, 64)
        got = rotate(x, positions, inv)
        cos, sin = rope_cos_sin(inv, positions.clamp(min=0), x.dtype)
        want = apply_rope(x, cos, sin)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
        monkeypatch.setattr(gemma4.native, "_module", False)
        assert torch.equal(rotate(x, positions, inv), want)  # the plain path is the torch ops
        monkeypatch.undo()


def test_rope_table_of_k_eq_v_keys_grows_and_equals_the_angles():
    """K=V layers rotate their keys through a cos/sin table by position: it grows past its first size
    (positions beyond it are right) and equals the angles computed directly."""
    from gemma4.model import attention

    freqs = torch.tensor([1.0, 0.1, 1e-3, 1e-5])
    for pos in (torch.tensor([[0, 5, 17]]), torch.tensor([[3, attention._TRIG_MIN * 3 + 7, -0]])):
        cos, sin = attention._cos_sin(freqs, pos)
        angle = pos.float()[..., None] * freqs
        assert cos.shape == (1, 3, 4)
        assert torch.allclose(cos, angle.cos(), atol=1e-6) and torch.allclose(sin, angle.sin(), atol=1e-6)
    assert attention._TRIG[(freqs.device, freqs.numpy().tobytes())][0].shape[0] > attention._TRIG_MIN * 3
