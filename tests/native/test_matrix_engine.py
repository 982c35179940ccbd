"""The matrix-engine path of many-row products (AMX bf16 tiles through MKL's bf16 GEMM, AVX-512 BF16 dequantising):
the dequantised bits, the product's rounding, where it is taken and where not, and what it costs in logits.

The tests of a path the CPU lacks are skipped by name (isa.py reads the CPU); the plain dequantisation runs
everywhere the kernels build."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import quantize

import gemma4
import gemma4.native
from gemma4.checkpoint import open_checkpoint
from gemma4.checkpoint.gguf_blocks import from_gguf
from gemma4.checkpoint.gguf_writer import write_gguf
from gemma4.native import isa, ops
from gemma4.quant.formats import QuantWeight, pack6, quantize_int4, quantize_int8
from reference import VOCAB, build_gemma4, mean_kl, tiny_vocab_metadata

EPS32 = float(np.finfo(np.float32).eps)
BF16_UNIT = 2.0**-8  # bf16 keeps 8 significant bits: rounding to nearest moves a value by at most 2^-8 of it

needs_kernels = pytest.mark.skipif(gemma4.native.compiled() is None, reason="native kernels not built here")
needs_avx512_bf16 = pytest.mark.skipif(not isa.has("avx512f", "avx512bw", "avx512vl", "avx512_bf16"),
                                       reason="this CPU lacks AVX-512 BF16")
needs_engine = pytest.mark.skipif(not isa.has(*isa.MATRIX_ENGINE_FLAGS) or gemma4.native.compiled() is None,
                                  reason="this CPU has no matrix engine (AMX bf16 with AVX-512 BF16)")


def _layouts() -> dict[str, QuantWeight]:
    """One matrix in every layout the kernels take (odd row count, K = 768: three Q-K groups)."""
    g = torch.Generator().manual_seed(3)
    n, k = 37, 768
    w = torch.randn(n, k, generator=g) ** 3  # heavy tails: blocks of very different scales
    gguf = {name: from_gguf(quantize(w.numpy(), qtype), qtype, (n, k))
            for name, qtype in {"q8_0": T.Q8_0, "q5_0": T.Q5_0, "q5_1": T.Q5_1, "q4_0": T.Q4_0}.items()}
    q4k = QuantWeight(4, 256, torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g),
                      torch.rand(n, k // 256, generator=g), torch.randn(n, k // 256, generator=g),
                      torch.randint(-64, 64, (n, k // 16), dtype=torch.int8, generator=g))
    q6k = QuantWeight(6, 256, pack6(torch.randint(0, 64, (n, k), generator=g)), torch.rand(n, k // 256, generator=g),
                      None, torch.randint(-64, 64, (n, k // 16), dtype=torch.int8, generator=g))
    return {"int8": quantize_int8(w), "int8_g16": quantize_int8(w, 16), "int4": quantize_int4(w), **gguf,
            "q4_k": q4k, "q6_k": q6k}


LAYOUTS = _layouts()


@pytest.fixture
def bf16_way(monkeypatch):
    """Quantised products on the engine take its bf16 way (GEMMA4_MATRIX_ENGINE=bf16), not the int8 or bf16 tiles
    (tests/native/test_int8_tiles.py, test_bf16_tiles.py); the choice is made again after the test."""
    monkeypatch.setenv("GEMMA4_MATRIX_ENGINE", "bf16")
    monkeypatch.setattr(ops, "_tiles", None)
    monkeypatch.setattr(ops, "_bf16_tiles", None)
    yield
    ops._tiles = ops._bf16_tiles = None


@needs_kernels
@pytest.mark.parametrize("version", ["plain", pytest.param("avx512", marks=needs_avx512_bf16)])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_dequantised_bf16_has_the_reference_bits(layout, version):
    """Both versions compute scale * q (+ zero) in float32 in the reference's order and round to nearest even:
    the same bits as QuantWeight.dequantize(bfloat16), not merely close ones."""
    w = LAYOUTS[layout]
    assert w.int8_layout
    got = gemma4.native.compiled().dequantize_bf16(w.q, w.scale, w.zero, w.bits, w.group, w.sub, version == "plain")
    want = w.dequantize(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got.view(torch.int16), want.view(torch.int16))


@needs_engine
@pytest.mark.parametrize("rows", [1, 24, 77])
def test_engine_gemm_sums_in_float32(rows):
    """The GEMM multiplies bf16 inputs exactly (8 x 8 significant bits fit float32) and sums in float32: any
    order of K float32 additions is within K * eps32 * sum|x w| of the exact sum, and the output is not
    rounded to bf16 (which alone would be off by up to 2^-8 of it)."""
    g = torch.Generator().manual_seed(7)
    k = 1000
    x, w = torch.randn(rows, k, generator=g).bfloat16(), torch.randn(53, k, generator=g).bfloat16()
    got = ops.matrix_engine().mm_bf16_f32(x, w)
    assert got.dtype == torch.float32
    exact = x.double() @ w.double().T
    bound = k * EPS32 * (x.abs().double() @ w.abs().double().T)
    assert ((got.double() - exact).abs() <= bound).all()


@needs_engine
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_prefills_many_rows_go_to_the_engine_within_bf16_rounding(layout, bf16_way):
    """In a prefill, from MATRIX_ENGINE_MIN_ROWS rows on, a product is the engine's: x rounded to bf16 times
    the matrix's exact bf16 dequantisation. Against the float64 product of the float activations and the exact
    float weights, each term x*w moves by at most 2^-8 + 2^-8 + 2^-16 of |x*w| (the two roundings), and the
    float32 sum by K * eps32 of sum|x*w|."""
    w = LAYOUTS[layout]
    k = w.shape[-1]
    x = torch.randn(ops.MATRIX_ENGINE_MIN_ROWS + 5, k, generator=torch.Generator().manual_seed(2))
    with ops.prefill_products():
        got = ops.qlinear(x, w)
    engine = ops.engine_product(x, w)
    assert torch.equal(got, engine)
    wf = w.dequantize().double()
    magnitude = x.abs().double() @ wf.abs().T
    bound = (2 * BF16_UNIT + BF16_UNIT**2 + k * EPS32) * magnitude
    assert ((got.double() - x.double() @ wf.T).abs() <= bound).all()


@needs_engine
def test_decode_and_verify_steps_keep_the_row_by_row_kernel(bf16_way):
    """Outside a prefill (decode, a speculative verify step of many rows) and below MATRIX_ENGINE_MIN_ROWS, the
    int8-activation kernel runs: each row gives the same bits alone as beside any others."""
    w = LAYOUTS["q8_0"]
    x = torch.randn(ops.MATRIX_ENGINE_MIN_ROWS + 9, w.shape[-1], generator=torch.Generator().manual_seed(5))
    kernel = gemma4.native.compiled()
    row_by_row = kernel.qmm_q8(x, w.q, w.scale, w.zero, w.bits, w.group, w.sub)
    assert torch.equal(ops.qlinear(x, w), row_by_row)
    few = x[: ops.MATRIX_ENGINE_MIN_ROWS - 1]
    with ops.prefill_products():
        assert torch.equal(ops.qlinear(few, w), row_by_row[: few.shape[0]])
        assert not torch.equal(ops.qlinear(x, w), row_by_row)


@needs_engine
def test_bf16_weights_take_the_engine_in_a_prefill():
    g = torch.Generator().manual_seed(6)
    w = torch.randn(48, 256, generator=g).bfloat16()
    x = torch.randn(ops.MATRIX_ENGINE_MIN_ROWS, 256, generator=g)
    with ops.prefill_products():
        got = ops.bf16_linear(x, w)
    assert torch.equal(got, ops.matrix_engine().mm_bf16_f32(x.bfloat16(), w))


def test_the_engine_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("GEMMA4_MATRIX_ENGINE", "off")
    assert not isa.matrix_engine_wanted()
    monkeypatch.setattr(ops, "_engine", None)
    assert ops.matrix_engine() is None
    monkeypatch.setattr(ops, "_engine", None)  # decided again after the test, from the real environment


# The engine rounds each activation to 8 significant bits (finer than the int8 path's step of a block's
# maximum / 127 for all but the block's largest elements) and each weight to 8 significant bits (where the
# int8 path keeps Q8_0's weights exact): per product its error is of the int8 path's order, so its KL from
# the float32 path should be too. Random tiny models are chaotic (the router's top-2 of 4 flips at near-ties:
# the comparable int8-activation test saw ratios of 0.25-1.5 over seeds), hence 2x; a misplaced scale,
# block or a bf16 output rounding costs orders of magnitude more.
@needs_engine
def test_engine_costs_no_more_than_the_int8_path(tmp_path, monkeypatch):
    build_gemma4(tmp_path / "hf", "blocks", seed=5)
    path = write_gguf(open_checkpoint(tmp_path / "hf"), tmp_path / "q8.gguf", "Q8_0", tiny_vocab_metadata())
    model = gemma4.load(path, progress=False)
    ids = torch.randint(3, VOCAB, (64,), generator=torch.Generator().manual_seed(4))
    got = {}
    for name, acts, engine in (("float", "float", False), ("int8", "int8", False), ("engine", "int8", None)):
        monkeypatch.setattr(ops, "_activations", acts)
        monkeypatch.setattr(ops, "_engine", engine)
        got[name] = model.forward(ids)
    assert ops.matrix_engine() is not None  # the last forward ran with the engine
    engine_cost, int8_cost = mean_kl(got["float"], got["engine"]), mean_kl(got["float"], got["int8"])
    assert 0 < engine_cost <= 2 * int8_cost, (engine_cost, int8_cost)


def test_info_names_the_cpu_extensions_and_the_kernels_chosen(monkeypatch):
    """`gemma4 info` and bench/ print isa.describe() and isa.kernel_plan(): the flags read are the CPU's, and the
    plan names the matrix engine exactly where it would run."""
    flags = isa.cpu_flags()
    described = isa.describe().split()
    assert ("AVX2" in described) == ("avx2" in flags) and ("AMX-BF16" in described) == ("amx_bf16" in flags)
    assert ("matrix engine" in isa.kernel_plan()) == isa.matrix_engine_wanted()
    monkeypatch.setenv("GEMMA4_MATRIX_ENGINE", "off")
    assert "matrix engine" not in isa.kernel_plan()


@needs_engine
def test_grouped_product_gives_each_group_its_own_matrix(bf16_way):
    """Rows grouped by expert, each group times its expert's matrix (ids in any order, groups of any size,
    tiles of the matrix spread over threads): within the same bf16 bound as one product."""
    g = torch.Generator().manual_seed(9)
    e, n, k = 5, 40, 512
    stacked = quantize_int8(torch.randn(e * n, k, generator=g))
    w = QuantWeight(8, 32, stacked.q.view(e, n, k), stacked.scale.view(e, n, k // 32), None)
    ids, counts = [3, 0, 4], [30, 1, 17]
    offsets = [0, 30, 31, 48]
    x = torch.randn(offsets[-1], k, generator=g)
    with ops.prefill_products():
        got = ops.grouped_product(x, w, ids, offsets)
    assert ops.grouped_product(x, w, ids, offsets) is None  # outside a prefill: the caller's per-expert path
    for i, c, a in zip(ids, counts, offsets):
        wf = w[i].dequantize().double()
        rows = x[a:a + c].double()
        bound = (2 * BF16_UNIT + BF16_UNIT**2 + k * EPS32) * (rows.abs() @ wf.abs().T)
        assert ((got[a:a + c].double() - rows @ wf.T).abs() <= bound).all()


@needs_engine
def test_grouped_product_of_bf16_matrices_reads_each_in_place():
    """A bf16 checkpoint's stacked experts: each group of rows (x rounded to bf16) times its own bf16 matrix, float32
    sums and output: the exact products of bf16 values summed in float32, within K * eps32 of sum|x w| (the GEMM's
    own bound above); x[tokens] is the gathered copy; outside a prefill the caller's per-expert path runs."""
    g = torch.Generator().manual_seed(10)
    e, n, k = 6, 70, 384  # N over a GEMM tile's 16 rows, not a multiple of them
    w = torch.randn(e, n, k, generator=g).bfloat16()
    ids, offsets = [5, 1, 2], [0, 33, 34, 60]
    x = torch.randn(40, k, generator=g)
    tokens = torch.randint(0, 40, (offsets[-1],), generator=g)
    with ops.prefill_products():
        got = ops.grouped_product(x, w, ids, offsets, tokens=tokens)
    assert got.dtype == torch.float32 and ops.grouped_product(x, w, ids, offsets) is None
    xb = x[tokens].bfloat16().double()
    for i, a, b in zip(ids, offsets, offsets[1:]):
        exact = xb[a:b] @ w[i].double().T
        bound = k * EPS32 * (xb[a:b].abs() @ w[i].double().abs().T)
        assert ((got[a:b].double() - exact).abs() <= bound).all()


# engine_attention rounds each probability and each value to bf16 for P·V (BF16_UNIT of each at most) and sums in
# float32 (S keys: S * eps32); the scores are float32 as the reference's: each is off by at most
# d * eps32 * scale * sum_i |q_i k_i|, which moves a probability by at most twice the row's largest such error,
# relatively. So each output element sum_j p_j v_j moves by at most
# (2 * BF16_UNIT + S * eps32 + 2 * max score error) * sum_j p_j |v_j|.
@needs_engine
def test_engine_attention_is_within_bf16_rounding_of_probabilities_and_values():
    g = torch.Generator().manual_seed(8)
    heads, t, d, scale = 4, 300, 72, 0.2
    q, k, v = (torch.randn(heads, t, d, generator=g) for _ in range(3))
    with ops.prefill_products():
        got = ops.engine_attention(q, k, v, scale=scale)
    p = torch.softmax(q.double() @ k.double().transpose(1, 2) * scale, dim=-1)
    exact = p @ v.double()
    score_err = (d * EPS32 * scale * (q.double().abs() @ k.double().abs().transpose(1, 2))).amax(-1, keepdim=True)
    bound = (2 * BF16_UNIT + t * EPS32 + 2 * score_err) * (p @ v.double().abs())
    assert got is not None and got.dtype == torch.float32
    assert ((got.double() - exact).abs() <= bound).all()
    assert ops.engine_attention(q[:, :8], k, v, 0.2) is None  # too few queries: torch's attention


# The tower on the engine rounds only the inputs of its products to bf16, keeping the residual stream, norms and
# softmax in float32; the reference run in bfloat16 rounds all of those too. So the engine's distance from the
# float32 tower is at most the bf16 reference's (a wrong scale, layout or head mapping moves it by far more).
@needs_engine
def test_vision_tower_on_the_engine_is_closer_to_float32_than_a_bf16_tower(tmp_path, monkeypatch):
    from gemma4.checkpoint.vision import HFVisionCheckpoint
    from gemma4.images import preprocess
    from gemma4.model.vision import load_vision
    from vision_reference import MAX_SOFT_TOKENS, VISION, build_multimodal, picture

    build_multimodal(tmp_path, seed=3, name="dense_kv", bidirectional="vision")
    from gemma4.images import Image

    img = Image.from_array(np.asarray(picture(64, 48, seed=5).convert("RGB")))
    p = preprocess(img, VISION["patch_size"], VISION["pooling_kernel_size"], MAX_SOFT_TOKENS)
    assert p.pixel_values.shape[0] >= ops.MATRIX_ENGINE_MIN_ROWS
    out = {}
    for mode in ("float", "int8"):
        monkeypatch.setattr(ops, "_activations", mode)
        tower = load_vision(HFVisionCheckpoint(open_checkpoint(tmp_path)), torch.float32, torch.device("cpu"))
        assert (tower.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16) == (mode == "int8")
        out[mode] = tower.encode(p.pixel_values, p.positions)
    monkeypatch.setattr(ops, "_activations", "float")
    bf16 = load_vision(HFVisionCheckpoint(open_checkpoint(tmp_path)), torch.bfloat16, torch.device("cpu"))
    ref_bf16 = bf16.encode(p.pixel_values, p.positions).float()
    engine_err = (out["int8"] - out["float"]).norm()
    bf16_err = (ref_bf16 - out["float"]).norm()
    assert 0 < engine_err <= bf16_err, (engine_err.item(), bf16_err.item())
