"""The audio tower's weights: from an HF multimodal checkpoint (config.json audio_config + the
model.audio_tower.* / model.embed_audio.* tensors) or from a llama.cpp mmproj GGUF (projector gemma4a,
tensors a.* and mm.a.*, written beside the vision tower by `convert_hf_to_gguf.py --mmproj`).

Both readers give an AudioConfig and tensors under our names (checkpoint/names.py), in our layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from ..audio_features import FeatureConfig
from ..config.audio import AudioConfig
from ..errors import ModelLoadError
from . import names
from .hf_parts import HFPart, read_json, tower_config
from .mmproj import AUDIO_PREFIXES, MmprojTower

PROJECTOR = "gemma4a"
DEPTHWISE = "lconv1d.depthwise_conv1d.weight"


class HFAudioCheckpoint(HFPart):
    """The audio tower inside an HF folder (a SafetensorsCheckpoint of a multimodal model)."""

    def __init__(self, text_checkpoint):
        audio, processor = tower_config(text_checkpoint, "audio_config", "a model without audio")
        self.config = AudioConfig.from_hf(audio, text_checkpoint.config.hidden_size, processor)
        extractor = (processor or {}).get("feature_extractor")
        if extractor is None:  # older saves keep the feature extractor in preprocessor_config.json
            pre = read_json(text_checkpoint.folder / "preprocessor_config.json") or {}
            extractor = pre if "Gemma4Audio" in str(pre.get("feature_extractor_type", "")) else None
        try:
            self.features = FeatureConfig.from_dict(extractor)
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"processor_config.json: {e}") from None
        if self.features.feature_size != self.config.feature_size:
            raise ModelLoadError(f"feature_extractor.feature_size: {self.features.feature_size} mel bins, but the "
                                 f"audio tower takes {self.config.feature_size}")
        super().__init__(text_checkpoint.files, names.audio_from_hf,
                         lambda key: key.startswith((names.HF_AUDIO_PREFIX, names.HF_AUDIO_EMBEDDER_PREFIX)), "audio",
                         missing=f"{text_checkpoint.folder}: audio_config is set but the checkpoint has no audio "
                                 f"tower tensors ({names.HF_AUDIO_PREFIX}*)")

    def tensor(self, name: str) -> torch.Tensor:
        t = super().tensor(name)
        if name.endswith(names.AUDIO_SOFTPLUS_FROM_HF):
            t = F.softplus(t.float())
        return t


class MmprojAudioCheckpoint(MmprojTower):
    """A llama.cpp mmproj GGUF holding a gemma4a audio tower (usually beside a gemma4v vision tower)."""

    tower = "audio"
    projector = PROJECTOR

    def __init__(self, path: str | Path, text_hidden_size: int | None = None):
        super().__init__(path, text_hidden_size)
        # llama.cpp fixes the features for gemma4a (16 kHz, 20 ms frames every 10 ms): the extractor's defaults
        self.features = FeatureConfig(feature_size=self.config.feature_size)

    def _projector_type(self) -> Any:
        projector = self.metadata.get("clip.audio.projector_type")
        if projector is None:
            raise ModelLoadError(f"{self.path.name}: the mmproj has no audio encoder")
        return projector

    def _holds(self, gguf_name: str) -> bool:
        return gguf_name.startswith(AUDIO_PREFIXES)

    def _from_gguf(self, gguf_name: str) -> str | None:
        return names.audio_from_gguf(gguf_name)

    def _config(self, text_hidden_size: int | None) -> AudioConfig:
        projection = self._projection(text_hidden_size, "audio ")
        hidden = int(self._need("clip.audio.embedding_length"))
        # The converter writes no channel counts, kernel width or output width: the tensors tell them.
        # The attention's chunk, context and cap are the reference's defaults, which llama.cpp fixes too.
        return AudioConfig(
            hidden_size=hidden,
            num_hidden_layers=int(self._need("clip.audio.block_count")),
            num_attention_heads=int(self._need("clip.audio.attention.head_count")),
            subsampling_conv_channels=(self._shape("a.conv1d.0.weight")[0], self._shape("a.conv1d.1.weight")[0]),
            output_proj_dims=self._shape("a.pre_encode.out.weight")[0],
            text_hidden_size=projection,
            conv_kernel_size=self._shape("a.blk.0.conv_dw.weight")[-1],
            use_clipped_linears=any(n.startswith("a.") and n.endswith(".input_max") for n in self.file.tensors),
            feature_size=int(self.metadata.get("clip.audio.num_mel_bins", 128)),
        ).validate()

    def _our_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (shape[0], 1, shape[1]) if name.endswith(DEPTHWISE) else shape

    def _to_ours(self, name: str, t: torch.Tensor) -> torch.Tensor:
        # llama.cpp keeps the depthwise kernel as [channels, width]
        return t[:, None, :] if name.endswith(DEPTHWISE) else t
