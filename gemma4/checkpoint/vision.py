"""The vision tower's weights: from an HF multimodal checkpoint (config.json vision_config + the
model.vision_tower.* / model.embed_vision.* tensors) or from a llama.cpp mmproj GGUF.

Both readers give a VisionConfig and tensors under our names (checkpoint/names.py), in our layout.
`write_mmproj` writes the mmproj layout llama.cpp's `convert_hf_to_gguf.py --mmproj` produces for
Gemma 4 (projector type gemma4v), so a GGUF text model can be paired with its tower.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config.vision import VisionConfig
from ..errors import ModelLoadError
from . import names
from .hf_parts import HFPart, tower_config
from .mmproj import AUDIO_PREFIXES, MMPROJ_ARCH, MmprojTower

PATCH_EMBD = "patch_embedder.input_proj.weight"
PROJECTOR = "gemma4v"
LLAMACPP_ROPE_THETA = 100.0  # llama.cpp fixes it for gemma4v; the GGUF has no key for it


def _conv_to_linear(w: torch.Tensor) -> torch.Tensor:
    """llama.cpp keeps the patch embedding as a conv kernel [out, channel, row, col]; ours is a linear
    layer over a patch flattened as (row, col, channel)."""
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)


def _linear_to_conv(w: torch.Tensor, patch: int) -> torch.Tensor:
    return w.reshape(w.shape[0], patch, patch, 3).permute(0, 3, 1, 2).contiguous()


class HFVisionCheckpoint(HFPart):
    """The vision tower inside an HF folder (a SafetensorsCheckpoint of a multimodal model)."""

    def __init__(self, text_checkpoint):
        vision, processor = tower_config(text_checkpoint, "vision_config", "a text-only model")
        self.config = VisionConfig.from_hf(vision, text_checkpoint.config.hidden_size, processor)
        super().__init__(text_checkpoint.files, names.vision_from_hf,
                         missing=f"{text_checkpoint.folder}: vision_config is set but the checkpoint has no vision "
                                 f"tower tensors ({names.HF_VISION_PREFIX}*)")


class MmprojCheckpoint(MmprojTower):
    """A llama.cpp mmproj GGUF holding a gemma4v vision tower (an audio tower beside it is ignored)."""

    tower = "vision"
    projector = PROJECTOR

    def _projector_type(self) -> Any:
        return self.metadata.get("clip.vision.projector_type") or self.metadata.get("clip.projector_type")

    def _holds(self, gguf_name: str) -> bool:
        return not gguf_name.startswith(AUDIO_PREFIXES)

    def _from_gguf(self, gguf_name: str) -> str | None:
        return names.vision_from_gguf(gguf_name)

    def _config(self, text_hidden_size: int | None) -> VisionConfig:
        hidden = int(self._need("clip.vision.embedding_length"))
        heads = int(self._need("clip.vision.attention.head_count"))
        projection = self._projection(text_hidden_size)
        tensors = self.file.tensors
        for needed in ("v.position_embd.weight", "v.blk.0.attn_q_norm.weight", "v.blk.0.attn_k.weight"):
            if needed not in tensors:
                raise ModelLoadError(f"{needed}: missing from the mmproj GGUF")
        # The converter writes no head size or KV head count: the norms and projections tell them.
        head_dim = int(tensors["v.blk.0.attn_q_norm.weight"].shape[-1])
        kv_heads = int(tensors["v.blk.0.attn_k.weight"].shape[0]) // head_dim
        return VisionConfig(
            hidden_size=hidden,
            intermediate_size=int(self._need("clip.vision.feed_forward_length")),
            num_hidden_layers=int(self._need("clip.vision.block_count")),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            patch_size=int(self._need("clip.vision.patch_size")),
            pooling_kernel_size=int(self.metadata.get("clip.vision.projector.scale_factor") or 3),
            position_embedding_size=int(tensors["v.position_embd.weight"].shape[1]),
            text_hidden_size=projection,
            rope_theta=LLAMACPP_ROPE_THETA,
            rms_norm_eps=float(self.metadata.get("clip.vision.attention.layer_norm_epsilon", 1e-6)),
            standardize="v.std_bias" in tensors,
            use_clipped_linears=any(n.endswith(".input_max") for n in tensors),
        ).validate()

    def _our_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (shape[0], int(np.prod(shape[1:]))) if name == PATCH_EMBD else shape

    def _to_ours(self, name: str, t: torch.Tensor) -> torch.Tensor:
        return _conv_to_linear(t) if name == PATCH_EMBD else t


def write_mmproj(checkpoint, path: str | Path, qtype: str = "F32") -> Path:
    """Write a vision checkpoint (HFVisionCheckpoint, or any reader with .config/.names()/.tensor()) as
    an mmproj GGUF. Matrices are written in `qtype` (F32, F16, or a block type the `gguf` package can
    quantise); the patch kernel stays F16/F32, the position table, norms and vectors F32, as llama.cpp
    writes them."""
    import gguf

    from .gguf_writer import _encode, _storage_type

    def encoded(t, qtype):
        """`t` in `qtype`, or F16 when its rows are not whole blocks, in its own shape."""
        stored = _storage_type(tuple(t.shape), qtype)
        data = _encode(t, stored)
        return data.reshape(*t.shape[:-1], data.shape[-1]), stored

    cfg: VisionConfig = checkpoint.config
    if cfg.rope_theta != LLAMACPP_ROPE_THETA:
        raise ValueError(f"rope_theta: llama.cpp's gemma4v fixes it at {LLAMACPP_ROPE_THETA}; an mmproj cannot "
                         f"express {cfg.rope_theta}")
    Q = gguf.GGMLQuantizationType
    qt = Q[qtype.upper()]
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    w = gguf.GGUFWriter(str(tmp), MMPROJ_ARCH)
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_clip_has_vision_encoder(True)
    w.add_clip_vision_projector_type(gguf.VisionProjectorType.GEMMA4V)
    w.add_vision_projection_dim(cfg.text_hidden_size)
    w.add_vision_image_size(224)  # unused by gemma4v; the converter writes this value
    w.add_vision_patch_size(cfg.patch_size)
    w.add_vision_embedding_length(cfg.hidden_size)
    w.add_vision_feed_forward_length(cfg.intermediate_size)
    w.add_vision_block_count(cfg.num_hidden_layers)
    w.add_vision_head_count(cfg.num_attention_heads)
    if cfg.pooling_kernel_size != 3:
        w.add_vision_projector_scale_factor(cfg.pooling_kernel_size)
    w.add_vision_attention_layernorm_eps(cfg.rms_norm_eps)
    w.add_vision_image_mean([0.0, 0.0, 0.0])
    w.add_vision_image_std([1.0, 1.0, 1.0])
    try:
        for name in checkpoint.names():
            gguf_name = names.vision_to_gguf(name)
            t = checkpoint.tensor(name).float()
            if name == PATCH_EMBD:
                t = _linear_to_conv(t, cfg.patch_size)
                data, dtype = encoded(t, Q.F16 if qt == Q.F16 else Q.F32)
            elif t.dim() == 0:
                data, dtype = t.reshape(1).numpy(), Q.F32
            elif name.endswith("position_embedding_table") or t.dim() == 1:
                data, dtype = t.numpy(), Q.F32
            else:
                data, dtype = encoded(t, qt)
            w.add_tensor(gguf_name, data, raw_dtype=dtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
