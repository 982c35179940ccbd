"""Quantised weights: lossless GGUF block conversion, the kernel against the dequantised float
product, quantised loading, and the quality cost of quantising at load (KL from float32)."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

import gemma4
from gemma4.checkpoint import open_checkpoint
from gemma4.checkpoint.gguf_writer import write_gguf
from gemma4.quant import kernels
from gemma4.quant.formats import from_gguf, quantize_int4, quantize_int8
from gemma4.quant.modules import QuantEmbedding, QuantLinear, QuantParam
from reference import VOCAB, build_gemma4, tiny_vocab_metadata

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


def _formats(w):
    return {"int4": quantize_int4(w), "int8": quantize_int8(w), "int8_g16": quantize_int8(w, 16)}


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("rows", [1, 3, 8, 9])
def test_kernel_equals_float_product_with_dequantised_weight(monkeypatch, native, rows):
    if not native:
        monkeypatch.setattr(kernels, "_native", False)  # the plain-torch path (CUDA, no compiler)
    elif kernels.native() is None:
        pytest.skip("no AVX2 kernel on this machine")
    g = torch.Generator().manual_seed(1)
    n, k = 72, 640
    w, x = torch.randn(n, k, generator=g), torch.randn(rows, k, generator=g)
    for name, qw in _formats(w).items():
        ref = x.double() @ qw.dequantize().double().T
        got = kernels.qlinear(x, qw).double()
        # Only float32 rounding differs: any summation order of K products (plus the per-group scale
        # and offset terms) is within (K + 4) * eps * sum|x * w| of the exact sum.
        bound = (k + 4) * EPS32 * (x.abs().double() @ qw.dequantize().abs().double().T)
        assert ((got - ref).abs() <= bound).all(), name


def test_quantised_weights_round_trip_within_half_a_step():
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(2))
    for name, qw in _formats(w).items():
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


def _mean_kl(p_logits, q_logits):
    p, q = torch.log_softmax(p_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


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
    ours, theirs = _mean_kl(ref, model.forward(ids)), _mean_kl(ref, twin.forward(ids))
    assert 0 < ours <= 1.25 * theirs, (ours, theirs)


def test_quantize_rejects_unknown_format(tmp_path):
    build_gemma4(tmp_path / "hf", "blocks", seed=5)
    with pytest.raises(ValueError, match="quantize"):
        gemma4.load(tmp_path / "hf", progress=False, quantize="int3")
