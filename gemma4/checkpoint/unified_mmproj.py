"""The unified model's (gemma4_unified) image and waveform embedders as llama.cpp ships them: the gemma4uv and
gemma4ua parts of an mmproj GGUF (convert_hf_to_gguf.py's Gemma4UnifiedVisionAudioModel), read through
mmproj.MmprojTower under our names (names.UNIFIED_VISION_GGUF, names.WAVEFORM_AUDIO_GGUF), the converter's
reorderings undone.

The converter writes the merged-patch projection's columns and the first LayerNorm in ggml's im2col order
(channel, row, column) instead of the reference's (row, column, channel), and the position table as
[axis, position, width]. It records no pooling kernel and no frame size: the tensors' shapes tell them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config.unified import UnifiedVisionConfig, WaveformAudioConfig
from ..errors import ModelLoadError
from . import names
from .mmproj import AUDIO_PREFIXES, MmprojTower

VISION_PROJECTOR, AUDIO_PROJECTOR = "gemma4uv", "gemma4ua"
LAYER_NORM_EPS = 1e-5  # torch's LayerNorm default, which the reference keeps and llama.cpp's gemma4uv graph fixes


def projector_types(path: str | Path) -> tuple[str | None, str | None]:
    """(clip.vision.projector_type, clip.audio.projector_type) of an mmproj GGUF."""
    from .gguf_file import GGUFFile

    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such mmproj file")
    meta = GGUFFile(path).metadata
    return meta.get("clip.vision.projector_type") or meta.get("clip.projector_type"), meta.get("clip.audio.projector_type")


def _float32_value(x: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-6, not 9.99999997e-07)."""
    return float(str(np.float32(x)))


class MmprojUnifiedVisionCheckpoint(MmprojTower):
    tower = "vision"
    projector = VISION_PROJECTOR
    what = "unified vision embedder"
    _from = {g: ours for ours, g in names.UNIFIED_VISION_GGUF.items()}

    def _projector_type(self):
        return self.metadata.get("clip.vision.projector_type") or self.metadata.get("clip.projector_type")

    def _holds(self, gguf_name: str) -> bool:
        return not gguf_name.startswith(AUDIO_PREFIXES)

    def _from_gguf(self, gguf_name: str) -> str | None:
        return self._from.get(gguf_name)

    def _config(self, text_hidden_size: int | None) -> UnifiedVisionConfig:
        projection = self._projection(text_hidden_size, "images ")
        width = self._shape("v.patch_embd.weight")[1]  # 3 x side^2 of a merged patch
        side = int(round((width / 3) ** 0.5))
        patch = int(self._need("clip.vision.patch_size"))
        if 3 * side * side != width or side % patch:
            raise ModelLoadError(f"v.patch_embd.weight: {width} columns are not 3 x a merged patch of whole "
                                 f"{patch}-pixel patches")
        d = int(self._need("clip.vision.embedding_length"))
        return UnifiedVisionConfig(
            patch_size=patch, pooling_kernel_size=side // patch, mm_embed_dim=d,
            mm_posemb_size=self._shape("v.position_embd.weight")[1], output_proj_dims=d, text_hidden_size=projection,
            rms_norm_eps=_float32_value(self.metadata.get("clip.vision.attention.layer_norm_epsilon", 1e-6)),
            layer_norm_eps=LAYER_NORM_EPS,
        ).validate()

    def _hwc_order(self) -> torch.Tensor:
        """perm[i]: the reference's (row, column, channel) index of the converter's column i (channel, row, column)."""
        p = self.config.model_patch_size
        i = torch.arange(3 * p * p)
        channel, row, col = i // (p * p), (i % (p * p)) // p, i % p
        return row * p * 3 + col * 3 + channel

    def _our_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (shape[1], shape[0], shape[2]) if name == "pos_embedding" else shape

    def _to_ours(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if name == "pos_embedding":
            return t.permute(1, 0, 2).contiguous()
        if name == "patch_dense.weight" or name.startswith("patch_ln1."):
            out = torch.empty_like(t)
            out[..., self._hwc_order()] = t
            return out
        return t


class MmprojWaveformAudioCheckpoint(MmprojTower):
    tower = "audio"
    projector = AUDIO_PROJECTOR
    what = "waveform audio embedder"
    _from = {g: ours for ours, g in names.WAVEFORM_AUDIO_GGUF.items()}

    def _holds(self, gguf_name: str) -> bool:
        return gguf_name.startswith(AUDIO_PREFIXES)

    def _from_gguf(self, gguf_name: str) -> str | None:
        return self._from.get(gguf_name)

    def _config(self, text_hidden_size: int | None) -> WaveformAudioConfig:
        projection = self._projection(text_hidden_size, "audio ")
        # llama.cpp fixes the frame at 640 samples (clip.cpp); the projection's width is the frame this file has
        samples = self._shape(names.WAVEFORM_AUDIO_GGUF["embedder.embedding_projection.weight"])[1]
        return WaveformAudioConfig(samples, projection, _float32_value(
            self.metadata.get("clip.audio.attention.layer_norm_epsilon", 1e-6)))
