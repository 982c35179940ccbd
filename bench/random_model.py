"""A random-weight Gemma 4 in the real 26B-A4B or E2B shape, written as an HF folder (bf16 safetensors).

The widths are the published text decoders'; only the number of layers is a choice (the real pattern:
26B-A4B five sliding layers then one full, E2B four sliding then one full; the last always full; E2B's
last 20 of 35 layers read earlier layers' KV, a fewer-layer E2B shares the same fraction). `tiny=True`
shrinks the widths for smoke runs. Tensors are drawn and written one at a time, a slab of rows at a time, so the ~10 GB of a
6-layer model never sit in memory. The tensor names and shapes are the engine's own table (its
Decoder built on the meta device): the same names transformers' Gemma4ForCausalLM saves.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any, Iterator

import torch

SLIDING, FULL = "sliding_attention", "full_attention"
WEIGHT_STD = 0.02  # with RMS-normed inputs every projection's output stays of order one
SLAB_ELEMENTS = 1 << 24  # rows are drawn in slabs of about this many elements

SHAPE_26B_A4B = dict(
    hidden_size=2816, intermediate_size=2112, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
    global_head_dim=512, num_global_key_value_heads=2, attention_k_eq_v=True, sliding_window=1024,
    enable_moe_block=True, num_experts=128, top_k_experts=8, moe_intermediate_size=704,
)
# Every row a whole number of 32-element blocks, so Q8_0 applies to every matrix.
SHAPE_TINY = dict(
    hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    global_head_dim=64, num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=1024,
    enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=32,
)
# The E2B text decoder (google/gemma-4-E2B-it config.json's text_config, as quoted by public third-party
# config parsers; llama.cpp: 35 layers name it E2B in src/models/gemma4.cpp, n_embd 1536 in
# tools/mtmd/mtmd.cpp): no MoE, no K=V, 1 KV head, per-layer embeddings of 256 per layer, the last 20 of
# 35 layers KV-shared with a double-wide (2 x 6144) MLP.
SHAPE_E2B = dict(
    hidden_size=1536, intermediate_size=6144, num_attention_heads=8, num_key_value_heads=1, head_dim=256,
    global_head_dim=512, attention_k_eq_v=False, sliding_window=512, hidden_size_per_layer_input=256,
    use_double_wide_mlp=True, max_position_embeddings=131072,
)
SHAPE_E2B_TINY = dict(
    hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
    global_head_dim=64, attention_k_eq_v=False, sliding_window=512, hidden_size_per_layer_input=32,
    use_double_wide_mlp=True, max_position_embeddings=131072,
)
E2B_LAYERS, E2B_SHARED = 35, 20
# shape name -> (widths, tiny widths, layers per sliding/full period)
SHAPES = {"26b-a4b": (SHAPE_26B_A4B, SHAPE_TINY, 6), "e2b": (SHAPE_E2B, SHAPE_E2B_TINY, 5)}


def layer_types(layers: int, period: int = 6) -> list[str]:
    return [FULL if (i + 1) % period == 0 or i == layers - 1 else SLIDING for i in range(layers)]


def kv_shared_layers(layers: int, shape: str) -> int:
    """E2B's 20 of 35 shared layers, the same fraction of fewer, leaving a sliding and a full layer unshared
    (the shared ones read their KV)."""
    if shape != "e2b":
        return 0
    shared = round(layers * E2B_SHARED / E2B_LAYERS)
    return max(0, min(shared, layers - 5))  # the first 5 hold both kinds


def hf_config(layers: int, vocab_size: int, tiny: bool = False, bos: int = 2, eos: int = 1, pad: int = 0,
              shape: str = "26b-a4b") -> dict:
    """config.json of a Gemma4ForCausalLM of this shape, spelled as transformers' Gemma4TextConfig."""
    if layers < 1:
        raise ValueError(f"layers: need at least 1, got {layers}")
    if shape not in SHAPES:
        raise ValueError(f"shape: unknown {shape!r} (known: {', '.join(SHAPES)})")
    widths, tiny_widths, period = SHAPES[shape]
    fields = {"max_position_embeddings": 262144, "hidden_size_per_layer_input": 0, "use_double_wide_mlp": False,
              **(tiny_widths if tiny else widths)}
    if fields["hidden_size_per_layer_input"]:
        fields["vocab_size_per_layer_input"] = vocab_size
    return dict(
        architectures=["Gemma4ForCausalLM"], model_type="gemma4_text", dtype="bfloat16",
        vocab_size=vocab_size, num_hidden_layers=layers, layer_types=layer_types(layers, period),
        **fields,
        hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, final_logit_softcapping=30.0,
        tie_word_embeddings=True, num_kv_shared_layers=kv_shared_layers(layers, shape), attention_bias=False,
        rope_parameters={SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
                         FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0}},
        bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
    )


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Our tensor name -> shape, from the engine's Decoder built on the meta device."""
    from gemma4.config.text import ModelConfig
    from gemma4.model.decoder import Decoder

    with torch.device("meta"):
        decoder = Decoder(ModelConfig.from_hf(config))
    return {name: tuple(t.shape) for name, t in decoder.state_dict().items()}


def _fill(name: str, shape: tuple[int, ...], generator: torch.Generator) -> Iterator[torch.Tensor]:
    """The tensor's values in slabs of leading rows (bf16). Norm weights, scales and layer scalars are 1
    (Gemma 4 norms multiply by the weight itself); matrices are normal * WEIGHT_STD, except the router,
    drawn at unit scale so its logits (of a unit-norm input) are of order one and tokens spread over
    the experts as a trained router spreads them."""
    if len(shape) == 1 or name.endswith(("norm.weight", "router.scale", "per_expert_scale", "layer_scalar")):
        yield torch.ones(shape, dtype=torch.bfloat16)
        return
    std = 1.0 if name.endswith("router.proj.weight") else WEIGHT_STD
    row = math.prod(shape[1:])
    step = max(1, SLAB_ELEMENTS // row)
    for start in range(0, shape[0], step):
        rows = min(step, shape[0] - start)
        slab = torch.randn((rows, *shape[1:]), generator=generator, dtype=torch.float32)
        yield slab.mul_(std).to(torch.bfloat16)


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], prefix: str = "model.", seed: int = 0) -> int:
    """Stream random bf16 tensors into one safetensors file (header first, then the data in the
    header's order); returns the bytes written. Writes `path` only once complete."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        n = math.prod(shape) * 2
        header[prefix + name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    generator = torch.Generator().manual_seed(seed)
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name, shape in shapes.items():
                for slab in _fill(name, shape, generator):
                    f.write(slab.contiguous().view(torch.int16).numpy().tobytes())
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return offset


def write_hf_folder(folder: Path, layers: int, vocab_size: int, special: dict[str, int], tiny: bool = False,
                    seed: int = 0, shape: str = "26b-a4b") -> Path:
    """config.json and model.safetensors (random bf16) in `folder`; `special` holds bos/eos/pad ids.
    config.json is written last: its presence marks the folder complete."""
    folder.mkdir(parents=True, exist_ok=True)
    config = hf_config(layers, vocab_size, tiny=tiny, shape=shape, **special)
    write_safetensors(folder / "model.safetensors", tensor_shapes(config), seed=seed)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder
