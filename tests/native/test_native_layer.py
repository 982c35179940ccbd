"""A decoder layer's dense parts in three native calls (norms, q/k/v, RoPE, o, MLP) against the same layer
run module by module: the same kernels on the same values, so the logits must be the same bits."""

import pytest
import torch

import gemma4
from gemma4.checkpoint import open_checkpoint
from gemma4.checkpoint.gguf_writer import write_gguf
from gemma4.engine import prefill
import gemma4.native
from gemma4.quant.formats import quantize_int4, quantize_int8
from gemma4.quant.modules import QuantLinear
from gemma4.store import embedded_path
from reference import build_gemma4, tiny_vocab_metadata

pytestmark = pytest.mark.skipif(gemma4.native.compiled() is None, reason="no AVX2 kernel on this machine")


def _logits(decoder, ids: torch.Tensor, native: bool, steps: int = 3) -> list[torch.Tensor]:
    """Prefill of ids [1, T], then `steps` decode steps: the logits of each call."""
    for layer in decoder.layers:
        layer._native_plan = None if native else False
    t = ids.shape[1]
    with torch.inference_mode():
        cache = decoder.new_cache(batch=1, capacity=t + steps + 4)
        out = [decoder.logits(prefill(decoder, cache, ids, torch.arange(t)[None]))]
        for i in range(steps):
            h = decoder(torch.tensor([[5 + i]]), torch.tensor([[t + i]]), cache)
            out.append(decoder.logits(h[:, -1]))
    if native:
        assert all(layer._native_plan for layer in decoder.layers), "the native path was not taken"
    return out


def _assert_same_bits(decoder, ids):
    for a, b in zip(_logits(decoder, ids, True), _logits(decoder, ids, False)):
        assert torch.equal(a, b), (a - b).abs().max()


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q5_1"])
def test_native_layers_equal_the_modules(tmp_path, qtype):
    """Gemma 4 layers with K=V global attention, v_norm and the MoE block, from GGUF blocks."""
    build_gemma4(tmp_path / "hf", "blocks", seed=4)
    path = write_gguf(open_checkpoint(tmp_path / "hf"), tmp_path / "m.gguf", qtype, tiny_vocab_metadata())
    decoder = gemma4.load(path, progress=False).decoder
    _assert_same_bits(decoder, torch.randint(3, 200, (1, 9), generator=torch.Generator().manual_seed(1)))


def test_native_layers_take_mixed_layouts_in_one_call(tmp_path):
    """q/k/v and gate/up share one quantisation of their input and one parallel region, whatever their
    layouts: int4 (paired activations), int8 with f16 scales and int8 per 16 (plain) side by side."""
    build_gemma4(tmp_path / "hf", "blocks", seed=5)
    path = write_gguf(open_checkpoint(tmp_path / "hf"), tmp_path / "m.gguf", "Q8_0", tiny_vocab_metadata())
    decoder = gemma4.load(path, progress=False).decoder
    for i, layer in enumerate(decoder.layers):
        a, m = layer.self_attn, layer.mlp
        a.q_proj = QuantLinear(quantize_int4(a.q_proj.qweight.dequantize()))
        m.up_proj = QuantLinear(quantize_int4(m.up_proj.qweight.dequantize()))
        m.gate_proj = QuantLinear(quantize_int8(m.gate_proj.qweight.dequantize(), 16))
        if i % 2:
            a.k_proj = QuantLinear(quantize_int4(a.k_proj.qweight.dequantize()))
    _assert_same_bits(decoder, torch.randint(3, 200, (1, 6), generator=torch.Generator().manual_seed(2)))


def test_native_layers_of_the_embedded_model_equal_the_modules():
    """Gemma 3 layers (no v_norm, no layer scalar) with the embedded file's Q4_K, Q5_0, Q6_K and Q8_0."""
    model = gemma4.load(embedded_path(), progress=False)
    ids = torch.tensor([model.tokenizer.encode("The capital of France is")])
    _assert_same_bits(model.decoder, ids)


def test_a_layer_with_a_float_matrix_keeps_the_module_path(tmp_path):
    build_gemma4(tmp_path / "hf", "blocks", seed=6)
    path = write_gguf(open_checkpoint(tmp_path / "hf"), tmp_path / "m.gguf", "Q8_0", tiny_vocab_metadata())
    decoder = gemma4.load(path, progress=False).decoder
    mlp = decoder.layers[0].mlp
    down = torch.nn.Linear(mlp.down_proj.shape[1], mlp.down_proj.shape[0], bias=False)
    down.weight.data = mlp.down_proj.qweight.dequantize()
    mlp.down_proj = down
    with torch.inference_mode():
        decoder(torch.tensor([[3, 4]]), torch.tensor([[0, 1]]), decoder.new_cache(batch=1, capacity=8))
    assert decoder.layers[0]._native_plan is False and decoder.layers[1]._native_plan


def test_moving_the_model_drops_the_plan(tmp_path):
    """The plan holds the layer's tensors: .to() (which may replace them) makes the next call plan again."""
    build_gemma4(tmp_path / "hf", "blocks", seed=7)
    path = write_gguf(open_checkpoint(tmp_path / "hf"), tmp_path / "m.gguf", "Q8_0", tiny_vocab_metadata())
    decoder = gemma4.load(path, progress=False).decoder
    with torch.inference_mode():
        decoder(torch.tensor([[3]]), torch.tensor([[0]]), decoder.new_cache(batch=1, capacity=4))
    assert all(layer._native_plan for layer in decoder.layers)
    decoder.to("cpu")
    assert all(layer._native_plan is None for layer in decoder.layers)


def test_load_swaps_in_the_fused_layer_where_the_kernels_take_the_weights(tmp_path):
    """The fused layer is a swap made at load, as QuantLinear is: layers of quantised matrices in the kernels'
    layouts get it, float layers keep the module path; the swapped layer keeps its modules' names."""
    from gemma4.model.decoder import DecoderLayer
    from gemma4.native.fused_layer import FusedLayer

    build_gemma4(tmp_path / "hf", "blocks", seed=8)
    plain = gemma4.load(tmp_path / "hf", progress=False).decoder
    assert not any(isinstance(layer, FusedLayer) for layer in plain.layers)
    path = write_gguf(open_checkpoint(tmp_path / "hf"), tmp_path / "m.gguf", "Q8_0", tiny_vocab_metadata())
    fused = gemma4.load(path, progress=False).decoder
    assert all(isinstance(layer, FusedLayer) and isinstance(layer, DecoderLayer) for layer in fused.layers)
    assert {n for n, _ in plain.named_modules()} <= {n for n, _ in fused.named_modules()}  # (+ quantised experts)
