"""Write a checkpoint as GGUF, with the metadata and tensor layout llama.cpp uses for gemma3/gemma4.

Block formats the `gguf` package can quantise (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, BF16, F16) are written
directly; K-quants need llama.cpp's quantiser. As llama.cpp does, 1-D tensors stay F32 and a matrix
whose rows are not a whole number of blocks falls back to F16.

Tensors are streamed: their table is written first, then each tensor is read, encoded a slab of rows at
a time and each slab written before the next is encoded, so a model (or a single table) far larger than
memory converts in little of it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ..config.assistant import AssistantConfig
from ..config.text import ModelConfig
from . import names

# The unrotated RoPE pairs of full layers, marked for llama.cpp by a huge frequency divisor.
UNROTATED_FACTOR = 1e30


def _write_config(w, cfg: ModelConfig, shared_kv_layers: int | None = None) -> None:
    n = cfg.num_hidden_layers
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(n)
    ff = [cfg.intermediate_size_of(i) for i in range(n)]
    w.add_feed_forward_length(ff[0] if len(set(ff)) == 1 else ff)  # per layer: the double-wide MLP
    w.add_head_count(cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_sliding_window(cfg.sliding_window)
    if cfg.final_logit_softcapping:
        w.add_final_logit_softcapping(float(cfg.final_logit_softcapping))
    full = cfg.rope["full_attention"]
    w.add_rope_freq_base(full.theta)
    w.add_rope_freq_base_swa(cfg.rope["sliding_attention"].theta)
    if cfg.architecture == "gemma3":
        # GGUF has no key for query_pre_attn_scalar: llama.cpp derives it from the sizes.
        derived = cfg.hidden_size // cfg.num_attention_heads if n == 62 else cfg.head_dim
        if abs(cfg.attention_scale - derived**-0.5) > 1e-9:
            raise ValueError("query_pre_attn_scalar: GGUF cannot express this model's value (llama.cpp derives it "
                             "from head_dim)")
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_head_count_kv(cfg.num_key_value_heads)
        if full.factor != 1.0:
            import gguf

            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(full.factor)
        w.add_sliding_window_pattern([cfg.is_sliding(i) for i in range(n)])
        return
    full_layers = [i for i in range(n) if not cfg.is_sliding(i)]
    head_full = cfg.head_dim_of(full_layers[0]) if full_layers else cfg.head_dim
    w.add_key_length(head_full)
    w.add_value_length(head_full)
    w.add_key_length_swa(cfg.head_dim)
    w.add_value_length_swa(cfg.head_dim)
    kv = [cfg.kv_heads_of(i) for i in range(n)]
    w.add_head_count_kv(kv[0] if len(set(kv)) == 1 else kv)
    w.add_sliding_window_pattern([cfg.is_sliding(i) for i in range(n)])
    w.add_rope_dimension_count(head_full)
    w.add_rope_dimension_count_swa(cfg.head_dim)
    w.add_shared_kv_layers(cfg.num_kv_shared_layers if shared_kv_layers is None else shared_kv_layers)
    w.add_embedding_length_per_layer_input(cfg.hidden_size_per_layer_input)
    if cfg.enable_moe_block:
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.top_k_experts)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)


def _rope_freqs(cfg: ModelConfig) -> np.ndarray | None:
    full_layers = [i for i in range(cfg.num_hidden_layers) if not cfg.is_sliding(i)]
    if cfg.architecture != "gemma4" or not full_layers:
        return None
    d = cfg.head_dim_of(full_layers[0])
    rotated = int(cfg.rope["full_attention"].partial_rotary_factor * d / 2)
    return np.array([1.0] * rotated + [UNROTATED_FACTOR] * (d // 2 - rotated), dtype=np.float32)


# Rows are encoded in slabs of about this many elements: bounds the float32 copy of a large tensor.
SLAB_ELEMENTS = 1 << 24


def _storage_type(shape: tuple[int, ...], qtype):
    """The GGML type a tensor of `shape` is stored as when `qtype` is asked for."""
    import gguf
    from gguf.constants import GGML_QUANT_SIZES

    Q = gguf.GGMLQuantizationType
    if len(shape) == 1 or qtype == Q.F32:
        return Q.F32
    if qtype == Q.F16:
        return Q.F16
    block, _ = GGML_QUANT_SIZES[qtype]
    return Q.F16 if shape[-1] % block else qtype


def _nbytes(shape: tuple[int, ...], qtype) -> int:
    import gguf
    from gguf.quants import quant_shape_to_byte_shape

    Q = gguf.GGMLQuantizationType
    if qtype in (Q.F32, Q.F16):
        return int(np.prod(shape)) * (4 if qtype == Q.F32 else 2)
    return int(np.prod(quant_shape_to_byte_shape(shape, qtype)))


def _slabs(tensor: torch.Tensor, qtype):
    """`tensor` in GGML type `qtype` (from _storage_type), a slab of rows at a time (one row per leading
    index); rows are blocks on their own, so the slabs' bytes are the whole tensor's."""
    import gguf

    Q = gguf.GGMLQuantizationType
    rows = tensor.reshape(-1, tensor.shape[-1]) if tensor.dim() > 1 else tensor.reshape(1, -1)
    step = max(1, SLAB_ELEMENTS // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        part = rows[start:start + step].float().numpy()
        if qtype == Q.F32:
            yield part
        elif qtype == Q.F16:
            yield part.astype(np.float16)
        else:
            yield gguf.quants.quantize(part, qtype)


def _encode(tensor: torch.Tensor, qtype) -> np.ndarray:
    """`tensor` in GGML type `qtype`, one row per leading index, in memory."""
    return np.concatenate(list(_slabs(tensor, qtype)))


class _Streamed:
    """A tensor's GGML bytes, encoded slab by slab while they are written: GGUFWriter.write_tensor_data
    asks only for .nbytes and .tofile, so a table larger than memory (E2B's per-layer embeddings: 4.7 GB
    in BF16) never sits in it whole."""

    def __init__(self, tensor: torch.Tensor, qtype, nbytes: int):
        self.tensor, self.qtype, self.nbytes = tensor, qtype, nbytes

    def tofile(self, f) -> None:
        written = 0
        for enc in _slabs(self.tensor, self.qtype):
            enc.tofile(f)
            written += enc.nbytes
        if written != self.nbytes:
            raise ValueError(f"internal: {written} bytes encoded, {self.nbytes} announced")


def write_gguf(checkpoint, path: str | Path, qtype: str = "F32",
               tokenizer_metadata: Mapping[str, Any] | None = None) -> Path:
    """Write `checkpoint` (any reader with .config, .names(), .shape(), .tensor()) to `path`; the file
    appears only once complete."""
    import gguf

    cfg: ModelConfig = checkpoint.config
    assistant = cfg if isinstance(cfg, AssistantConfig) else None
    if assistant is not None:
        cfg = assistant.text
    qt = gguf.GGMLQuantizationType[qtype.upper()]
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    w = gguf.GGUFWriter(str(partial), ASSISTANT_ARCH if assistant else cfg.architecture)
    try:
        if assistant is None:
            _write_config(w, cfg)
        else:
            _write_assistant_config(w, assistant)
        for key, value in (tokenizer_metadata or {}).items():
            _add_any(w, key, value)
        freqs = _rope_freqs(cfg)
        plan: list[tuple[str | None, Any, int]] = []  # (our name, or None for rope_freqs; storage type; bytes)
        if freqs is not None:
            w.add_tensor_info("rope_freqs.weight", freqs.shape, freqs.dtype, freqs.nbytes)
            plan.append((None, gguf.GGMLQuantizationType.F32, freqs.nbytes))
        for name in checkpoint.names():
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            shape = tuple(checkpoint.shape(name))
            stype = _storage_type(shape, qt)
            nbytes = _nbytes(shape, stype)
            w.add_tensor_info(names.to_gguf(name), shape, np.dtype(np.float32), nbytes, raw_dtype=stype)
            plan.append((name, stype, nbytes))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for name, stype, nbytes in plan:
            w.write_tensor_data(freqs if name is None else _Streamed(checkpoint.tensor(name), stype, nbytes))
        w.close()
        os.replace(partial, path)
    finally:
        w.close()
        partial.unlink(missing_ok=True)
    return path


ASSISTANT_ARCH = "gemma4-assistant"


def _write_assistant_config(w, cfg: AssistantConfig) -> None:
    """llama.cpp's gemma4-assistant keys: the decoder's, every layer's KV shared, the target's width as
    embedding_length_out; and the masked head's top-k (a key of ours: llama.cpp drops that head)."""
    n = cfg.text.num_hidden_layers
    _write_config(w, cfg.text, shared_kv_layers=n)
    w.add_embedding_length_out(cfg.backbone_hidden_size)
    w.add_nextn_predict_layers(n)
    if cfg.use_ordered_embeddings:
        w.add_uint32(f"{ASSISTANT_ARCH}.centroid_intermediate_top_k", cfg.centroid_intermediate_top_k)


def _add_any(w, key: str, value: Any) -> None:
    import gguf

    V = gguf.GGUFValueType
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value) if value >= 0 else w.add_int32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        w.add_array(key, list(value))
    else:
        raise TypeError(f"{key}: cannot write a value of type {type(value).__name__} ({V})")
