"""Build a Decoder from a checkpoint reader: check every tensor's name and shape, then place it.

The module is built on the meta device, so nothing is allocated twice; each tensor is read from the
memory-mapped file, converted to its dtype and device, and assigned.

Weight matrices (the linear layers, the experts, the embedding / tied head) are swapped for quantised
modules when the checkpoint stores them quantised (GGUF blocks, converted without dequantising) or
when `quantize` asks for it (float weights quantised at load). The router stays float: it picks the
experts, and it is tiny. On the CPU, a layer whose matrices the native kernels take then gets the fused
native layer (gemma4.native.fused_layer), the same bits in three calls.
"""

from __future__ import annotations

import re
import sys

import torch

from ..errors import ModelLoadError
from ..native import fused_layer
from ..quant import formats
from ..quant.modules import QuantEmbedding, QuantLinear, QuantParam
from .decoder import Decoder

QUANTIZE = ("int4", "int8")

# Checkpoint entries that are not weights of ours and carry no meaning for inference.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _target_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    # Norm weights stay float32: the norms compute in float32 and these tensors are tiny.
    return torch.float32 if name.endswith("norm.weight") else dtype


_EMBEDDINGS = ("embed_tokens", "embed_tokens_per_layer")  # row lookups (QuantEmbedding when quantised)
_PER_LAYER_MATRICES = ("per_layer_model_projection.weight", "per_layer_input_gate.weight",
                       "per_layer_projection.weight")


def _is_matrix(name: str) -> bool:
    """Weights that may be held quantised: linear layers, experts, embeddings / output head."""
    if ".router." in name or name.endswith("norm.weight"):
        return False
    return (name.endswith(("_proj.weight", ".gate_up_proj", ".down_proj", *_PER_LAYER_MATRICES))
            or name in ("lm_head.weight", *(e + ".weight" for e in _EMBEDDINGS)))


def _unused(config, name: str) -> bool:
    """Tensors a checkpoint may carry that no module reads: the K/V projections and norms of KV-shared
    layers (published E2B/E4B checkpoints keep them; the reference ignores them too)."""
    m = re.fullmatch(r"layers\.(\d+)\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\.weight", name)
    return m is not None and int(m.group(1)) < config.num_hidden_layers and config.kv_shared(int(m.group(1)))


def _quantized(checkpoint, name: str, quantize: str | None):
    """The tensor as a QuantWeight, or None to keep it float."""
    if not _is_matrix(name):
        return None
    stored = checkpoint.quantized(name) if hasattr(checkpoint, "quantized") else None
    if stored is not None or quantize is None:
        return stored
    w = checkpoint.tensor(name)
    if w.shape[-1] % 32:
        return None  # rows that are not whole groups stay float
    # The tied embedding is also the output head, the most sensitive matrix: int8 even for int4.
    if quantize == "int8" or name == "embed_tokens.weight":
        return formats.quantize_int8(w)
    return formats.quantize_int4(w)


def _swap(decoder: Decoder, name: str, w, dtype: torch.dtype) -> None:
    path, _, leaf = name.rpartition(".")
    if leaf == "weight":  # a Linear or the embedding: the module itself is replaced
        parent_path, _, attr = path.rpartition(".")
        parent = decoder.get_submodule(parent_path) if parent_path else decoder
        module = QuantEmbedding(w, dtype) if attr in _EMBEDDINGS else QuantLinear(w)
        setattr(parent, attr, module)
    else:  # an experts' stacked matrix
        parent = decoder.get_submodule(path)
        delattr(parent, leaf)
        setattr(parent, leaf, QuantParam(w))


def build_decoder(checkpoint, dtype: torch.dtype, device: torch.device, progress: bool = True,
                  quantize: str | None = None, layout=None) -> Decoder:
    """layout: one rank's share of the model (gemma4.distributed.shard.Layout): its modules (build), each
    tensor's part (cut, right after reading), and whether the fused native layer applies (fused)."""
    if quantize not in (None, *QUANTIZE):
        raise ValueError(f"quantize: unsupported {quantize!r} (use {' or '.join(QUANTIZE)})")
    config = checkpoint.config
    with torch.device("meta"):
        decoder = Decoder(config)
    expected = {name: tuple(t.shape) for name, t in decoder.state_dict().items()}

    available = set(checkpoint.names())
    for name in sorted(available - set(expected)):
        if (name == "lm_head.weight" and config.tie_word_embeddings or name.endswith(_IGNORED_SUFFIXES)
                or _unused(config, name)):
            continue
        raise ModelLoadError(f"{name}: unexpected tensor in checkpoint (does config.json match the weights?)")
    for name, shape in expected.items():
        if name not in available:
            raise ModelLoadError(f"{name}: missing from checkpoint")
        got = checkpoint.shape(name)
        if tuple(got) != shape and not (name.endswith("layer_scalar") and int(torch.Size(got).numel()) == 1):
            raise ModelLoadError(f"{name}: shape {list(got)} in checkpoint, expected {list(shape)}")
    if layout is not None:  # the names and shapes checked are the whole model's; the modules are the shard's
        with torch.device("meta"):
            decoder = layout.build(config)

    names = list(expected)
    if hasattr(checkpoint, "prepare_quantized"):  # converted once into a cache file, then mapped from it
        checkpoint.prepare_quantized([n for n in names if _is_matrix(n)])
    bar = None
    if progress and sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=len(names), desc="loading", unit="tensor", leave=False)
    state = {}
    swapped = []
    for name in names:
        w = _quantized(checkpoint, name, quantize)
        if w is not None:
            if layout is not None:
                w = layout.cut(name, w)
            _swap(decoder, name, w.to(device), dtype)
            swapped.append(name)
        else:
            t = checkpoint.tensor(name).reshape(expected[name])
            if layout is not None:
                t = layout.cut(name, t)
            state[name] = t.to(device=device, dtype=_target_dtype(name, dtype))
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    missing, unexpected = decoder.load_state_dict(state, strict=False, assign=True)
    still_empty = [n for n, t in [*decoder.named_parameters(), *decoder.named_buffers()] if t.is_meta]
    if unexpected or still_empty:
        raise ModelLoadError(f"internal: tensors not placed: {(unexpected + still_empty)[:3]}")
    decoder.to(device)  # the non-persistent buffers (RoPE frequencies) were built on the CPU
    decoder.eval()
    decoder.requires_grad_(False)
    if decoder.device.type == "cpu" and (layout is None or layout.fused):
        for layer in decoder.layers:
            fused_layer.install(layer)
    return decoder
