"""Gemma 4 assistant checkpoints: an HF folder (config.json model_type gemma4_assistant or
gemma4_unified_assistant + safetensors) or
a GGUF file (llama.cpp arch gemma4-assistant) -> AssistantConfig + named tensors.

GGUF metadata has no field for the masked head's top-k; this project writes
`gemma4-assistant.centroid_intermediate_top_k`, and a file without the masked-head tensors (llama.cpp's
converter drops them) gets the full-vocabulary head, as llama.cpp computes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config.assistant import ASSISTANT_TEXT_TYPES, AssistantConfig
from ..errors import ModelLoadError
from . import GGUF_MAGIC, names
from .gguf import GGUFCheckpoint
from .gguf_file import GGUFFile
from .safetensors import SafetensorsCheckpoint

GGUF_ARCH = "gemma4-assistant"
TOP_K_KEY = "centroid_intermediate_top_k"
DEFAULT_TOP_K = 32  # the reference config's default


def open_assistant(path: str | Path):
    """The assistant checkpoint at `path`; ModelLoadError when it is something else."""
    path = Path(path).expanduser()
    if path.is_file() and path.name == "config.json":
        path = path.parent
    if path.is_dir():
        return HFAssistantCheckpoint(path)
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == GGUF_MAGIC:
            return GGUFAssistantCheckpoint(path)
        raise ModelLoadError(f"{path}: not a Gemma 4 assistant (expected a GGUF file or an HF checkpoint folder)")
    raise ModelLoadError(f"{path}: no such file or folder")


def is_assistant(path: str | Path) -> bool:
    """Whether `path` claims to be a Gemma 4 assistant (config.json model_type, or the GGUF architecture);
    it is then loaded as one, and its errors are its own."""
    path = Path(path).expanduser()
    if path.is_file() and path.name == "config.json":
        path = path.parent
    try:
        if path.is_dir():
            return json.loads((path / "config.json").read_text()).get("model_type") in ASSISTANT_TEXT_TYPES
        if path.is_file():
            with open(path, "rb") as f:
                if f.read(4) != GGUF_MAGIC:
                    return False
            return GGUFFile(path).metadata.get("general.architecture") == GGUF_ARCH
    except (OSError, ValueError, AttributeError, ModelLoadError):
        return False
    return False


class HFAssistantCheckpoint(SafetensorsCheckpoint):
    """An assistant's HF folder: the text reader's files and tensors, the assistant's config and names."""

    def _config(self, raw: dict) -> AssistantConfig:
        return AssistantConfig.from_hf(raw)

    @staticmethod
    def _our_name(key: str) -> str | None:
        if key in names.ASSISTANT_TOP_LEVEL or key == "lm_head.weight":
            return key
        if key.startswith("model."):
            return key[len("model."):]
        return None

    def _as_ours(self, name: str, t: torch.Tensor) -> torch.Tensor:
        return t  # a Gemma 4 decoder: its norms are stored as used


class GGUFAssistantCheckpoint(GGUFCheckpoint):
    """An assistant's GGUF: the text reader's file and tensors, the assistant's architecture and config."""

    def _check_architecture(self, arch) -> None:
        if arch != GGUF_ARCH:
            raise ModelLoadError(f"general.architecture: {arch!r} is not a Gemma 4 assistant ({GGUF_ARCH})")

    def _configure(self) -> None:
        text = self._hf_config()  # the decoder's fields, as for gemma4
        text.pop("num_kv_shared_layers", None)
        centroids = self._tensors.get(names.to_gguf("masked_embedding.centroids.weight"))
        raw = dict(model_type="gemma4_assistant", text_config=text,
                   backbone_hidden_size=self._need("embedding_length_out"),
                   use_ordered_embeddings=centroids is not None)
        if centroids is not None:
            raw.update(num_centroids=int(centroids.shape[0]),
                       centroid_intermediate_top_k=int(self._key(TOP_K_KEY, DEFAULT_TOP_K)))
        self.raw_config = raw
        self.config = AssistantConfig.from_hf(raw)
