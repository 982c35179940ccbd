"""Many-row products of int4 weights on AMX bf16 tiles (amx_bf16_products.cpp): against the exact product of the
bf16 values they multiply, every layout and shape edge, the gathered rows, and the rule that picks them.

Skipped by name where the CPU has no AMX bf16 (isa.py reads the CPU); the rule's way back runs everywhere."""

import numpy as np
import pytest
import torch

import gemma4
import gemma4.native
from gemma4.checkpoint import open_checkpoint
from gemma4.checkpoint.gguf_writer import write_gguf
from gemma4.native import isa, ops
from gemma4.quant.formats import QuantWeight
from reference import VOCAB, build_gemma4, mean_kl, tiny_vocab_metadata

EPS32 = float(np.finfo(np.float32).eps)


def _tiles_here() -> bool:
    kernel = gemma4.native.compiled()
    return (kernel is not None and isa.has(*isa.MATRIX_ENGINE_FLAGS) and kernel.matrix_engine_gemm()
            and kernel.amx_bf16_ready())


needs_tiles = pytest.mark.skipif(not _tiles_here(), reason="this CPU has no AMX bf16 tiles (or the kernels are not built)")


def _layouts(e: int, n: int, k: int, seed: int = 0) -> dict[str, QuantWeight]:
    """Stacked int4 matrices [e, n, k]: Q4_K (group scale and offset x integer block multipliers), groups of 32
    with offsets (Q4_0/Q4_1 as held) and without."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 256, (e, n, k // 2), dtype=torch.uint8, generator=g)
    return {
        "q4_k": QuantWeight(4, 256, q, torch.rand(e, n, k // 256, generator=g) * 1e-2,
                            -torch.rand(e, n, k // 256, generator=g) * 1e-2,
                            torch.randint(0, 64, (e, n, k // 16), dtype=torch.int8, generator=g)),
        "int4": QuantWeight(4, 32, q, torch.rand(e, n, k // 32, generator=g) * 0.1,
                            -torch.rand(e, n, k // 32, generator=g), None),
        "int4_no_offset": QuantWeight(4, 32, q, torch.randn(e, n, k // 32, generator=g) * 0.1, None, None),
    }


def _exact(x: torch.Tensor, w: QuantWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] times one matrix w: the exact product (float64) of the bf16 values the tiles multiply (x rounded to
    bf16, w's dequantisation rounded to bf16), and the same with absolute values (the sums' error bound's scale)."""
    wb = w.dequantize(torch.bfloat16).double()
    xb = x.bfloat16().double()
    return xb @ wb.T, xb.abs() @ wb.abs().T


def _check(got: torch.Tensor, x: torch.Tensor, w: QuantWeight) -> None:
    """Each product of two bf16 values is exact in float32; only the float32 sums round: at most K roundings of
    at most EPS32/2 of the running sum, bounded by K * EPS32 times the sum of the absolute products."""
    want, scale = _exact(x, w)
    k = x.shape[1]
    assert torch.all((got.double() - want).abs() <= k * EPS32 * scale + 1e-30)


# K: Q4_K 256 (one chunk of 8 steps) and 512 (two); groups of 32: 32 (one block), 96 (an odd last block), 288 (nine
# blocks: a chunk of 8 and the odd last block alone in the second), 512.
SHAPES = [("q4_k", 256), ("q4_k", 512), ("int4", 32), ("int4", 96), ("int4", 288), ("int4", 512),
          ("int4_no_offset", 96), ("int4_no_offset", 288)]


@needs_tiles
@pytest.mark.parametrize("layout,k", SHAPES)
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 32, 33, 48, 50])
def test_one_matrix_is_the_bf16_product_within_the_float32_sums(layout, k, rows):
    """Row counts of partial, whole, paired and odd activation tiles (more than two: sums kept between chunks in
    memory); 40 weight rows (a tile of 32 and one of 8)."""
    w = _layouts(1, 40, k, seed=rows)[layout]
    one = w[0]
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    got = ops.matrix_engine().amx_bf16_grouped(x, None, one.q, one.scale, one.zero, 4, one.group, one.sub, [0], [0, rows])
    _check(got, x, one)


@needs_tiles
def test_the_dequantised_weights_are_the_reference_bf16_values():
    """One-hot rows pick single weights: the tiles' values are QuantWeight.dequantize(bfloat16)'s bits (its float32
    scale * q, + offset, in that order), at every position of a pair of blocks and of an odd last block."""
    for layout, k in (("q4_k", 2816), ("int4", 32), ("int4", 288), ("int4_no_offset", 288)):
        one = _layouts(1, 33, k)[layout][0]
        eye = torch.eye(k)
        got = ops.matrix_engine().amx_bf16_grouped(eye, None, one.q, one.scale, one.zero, 4, one.group, one.sub,
                                                   [0], [0, k])
        assert torch.equal(got.T, one.dequantize(torch.bfloat16).float()), layout


@needs_tiles
def test_groups_gathered_rows_and_empty_groups():
    """Several matrices of a stack, one of them hit by no row, rows picked from x by index (a prefill's routed
    experts: x[tokens], without the gathered copy): each group is its matrix's product of its rows."""
    e, n, k = 5, 72, 512
    w = _layouts(e, n, k, seed=3)["q4_k"]
    g = torch.Generator().manual_seed(4)
    x = torch.randn(40, k, generator=g)
    ids, offsets = [4, 1, 0, 2], [0, 20, 20, 53, 90]
    tokens = torch.randint(0, 40, (90,), generator=g)
    got = ops.matrix_engine().amx_bf16_grouped(x, tokens, w.q, w.scale, w.zero, 4, 256, w.sub, ids, offsets)
    assert got.shape == (90, n)
    for i, a, b in zip(ids, offsets, offsets[1:]):
        if b > a:
            _check(got[a:b], x[tokens[a:b]], w[i])
    alone = ops.matrix_engine().amx_bf16_grouped(x[tokens].contiguous(), None, w.q, w.scale, w.zero, 4, 256, w.sub,
                                                 ids, offsets)
    assert torch.equal(got, alone)


@needs_tiles
def test_bad_arguments_are_refused():
    one = _layouts(1, 16, 256)["q4_k"][0]
    kernel = ops.matrix_engine()
    x = torch.randn(4, 256)
    with pytest.raises(RuntimeError, match="rows"):
        kernel.amx_bf16_grouped(x, torch.tensor([0, 1, 2, 9]), one.q, one.scale, one.zero, 4, 256, one.sub, [0], [0, 4])
    with pytest.raises(RuntimeError, match="offsets"):
        kernel.amx_bf16_grouped(x, None, one.q, one.scale, one.zero, 4, 256, one.sub, [0], [0, 3])
    with pytest.raises(RuntimeError, match="int4"):
        kernel.amx_bf16_grouped(x, None, one.q, one.scale, one.zero, 8, 32, None, [0], [0, 4])
    wide = torch.randn(4, 512)  # a row wider than the matrix's: refused before any read past its bytes
    with pytest.raises(RuntimeError, match=r"weights \[\.\.\., 256\] \(contiguous\) for K = 512"):
        kernel.amx_bf16_grouped(wide, None, one.q, one.scale, one.zero, 4, 256, one.sub, [0], [0, 4])
    with pytest.raises(RuntimeError, match="weights"):  # the same check guards the row kernels
        gemma4.native.compiled().qmm_q8(wide, one.q, one.scale, one.zero, 4, 256, one.sub)


@needs_tiles
def test_a_prefill_takes_the_bf16_tiles_by_the_rule(mode):
    """In a prefill, an int4 product of up to BF16_TILES_MAX_ROWS rows per matrix takes the bf16 tiles, more the
    dequantise-then-GEMM way; routed experts are judged by their rows per expert; GEMMA4_MATRIX_ENGINE=bf16 and
    =int8 keep the ways they name."""
    mode("on")
    k = 256
    w = _layouts(1, 48, k)["q4_k"]
    one = w[0]
    g = torch.Generator().manual_seed(6)
    few = torch.randn(ops.MATRIX_ENGINE_MIN_ROWS, k, generator=g)
    many = torch.randn(ops.BF16_TILES_MAX_ROWS + 1, k, generator=g)
    kernel = ops.matrix_engine()
    tiles = lambda x: kernel.amx_bf16_grouped(x, None, one.q, one.scale, one.zero, 4, 256, one.sub, [0], [0, x.shape[0]])
    gemm = lambda x: kernel.engine_mm_grouped(x.bfloat16(), one.q, one.scale, one.zero, 4, 256, one.sub, [0],
                                              [0, x.shape[0]])
    with ops.prefill_products():
        assert torch.equal(ops.qlinear(few, one), tiles(few))
        assert torch.equal(ops.qlinear(many, one), gemm(many))
        tokens = torch.arange(few.shape[0])
        assert torch.equal(ops.grouped_product(few, w, [0], [0, few.shape[0]], tokens=tokens), tiles(few))
        mode("bf16")
        assert torch.equal(ops.qlinear(few, one), gemm(few))
        mode("int8")
        assert not ops.on_bf16_tiles(one, 1)


def test_a_cpu_without_the_matrix_engine_keeps_the_other_ways(monkeypatch, mode):
    """Where the CPU lacks AMX bf16 (here: reported so), no product takes the bf16 tiles."""
    mode("on")
    monkeypatch.setattr(isa, "has", lambda *flags: not set(flags) & {"amx_bf16"} and isa.cpu_flags() >= set(flags))
    assert ops.bf16_tiles() is None and not ops.on_bf16_tiles(_layouts(1, 16, 256)["q4_k"][0], 1)


class _Counted:
    """The compiled module with its amx_bf16_grouped calls counted."""

    def __init__(self, module):
        self.module, self.calls = module, 0

    def __getattr__(self, name):
        return getattr(self.module, name)

    def amx_bf16_grouped(self, *args):
        self.calls += 1
        return self.module.amx_bf16_grouped(*args)


# The tiles round each activation and each dequantised int4 weight to bf16 (8 significant bits), as the matrix
# engine's GEMM way does, where the int8 path rounds activations to a step of a block's maximum / 127 and keeps
# the weights exact: per product an error of the int8 path's order, so the logits' KL from the float32 path should
# be too. Random tiny models are chaotic (the router's top-2 of 4 flips at near-ties), hence 2x, as in
# test_matrix_engine.py; a misplaced scale, offset, nibble or pair of k costs orders of magnitude more.
@needs_tiles
def test_a_q4_0_model_on_the_tiles_costs_no_more_than_the_int8_path(tmp_path, monkeypatch, mode):
    mode("on")
    build_gemma4(tmp_path / "hf", "blocks", seed=5)
    path = write_gguf(open_checkpoint(tmp_path / "hf"), tmp_path / "q4.gguf", "Q4_0", tiny_vocab_metadata())
    model = gemma4.load(path, progress=False)
    ids = torch.randint(3, VOCAB, (64,), generator=torch.Generator().manual_seed(4))
    got = {}
    for name, acts, engine in (("float", "float", False), ("int8", "int8", False), ("tiles", "int8", None)):
        monkeypatch.setattr(ops, "_activations", acts)
        monkeypatch.setattr(ops, "_engine", engine)
        monkeypatch.setattr(ops, "_bf16_tiles", None if engine is None else False)
        if engine is None:
            monkeypatch.setattr(ops, "_bf16_tiles", _Counted(ops.bf16_tiles()))
        got[name] = model.forward(ids)
    assert ops._bf16_tiles.calls > 0  # the last forward's int4 products ran on the tiles
    tiles_cost, int8_cost = mean_kl(got["float"], got["tiles"]), mean_kl(got["float"], got["int8"])
    assert 0 < tiles_cost <= 2 * int8_cost, (tiles_cost, int8_cost)
