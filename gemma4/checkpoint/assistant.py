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
from .gguf import ROPE_FREQS, GGUFCheckpoint
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
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        config_path = self.folder / "config.json"
        if not config_path.is_file():
            raise ModelLoadError(f"{self.folder}: no config.json (not an HF checkpoint folder)")
        try:
            self.raw_config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{config_path}: not valid JSON ({e})") from None
        self.config = AssistantConfig.from_hf(self.raw_config)
        self._files = self._shards()
        self._where = {}
        for path in self._files:
            for key in self._open(path).keys():
                ours = _hf_name(key)
                if ours is not None:
                    self._where.setdefault(ours, (path, key))

    def tensor(self, name: str) -> torch.Tensor:
        path, key = self._where[name]
        try:
            return self._open(path).get_tensor(key)
        except (OSError, RuntimeError) as e:
            raise ModelLoadError(f"{name}: cannot read from {path.name} ({e})") from None


def _hf_name(key: str) -> str | None:
    if key in names.ASSISTANT_TOP_LEVEL or key == "lm_head.weight":
        return key
    if key.startswith("model."):
        return key[len("model."):]
    return None


class GGUFAssistantCheckpoint(GGUFCheckpoint):
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.file = GGUFFile(self.path)
        self.metadata = self.file.metadata
        arch = self.metadata.get("general.architecture")
        if arch != GGUF_ARCH:
            raise ModelLoadError(f"general.architecture: {arch!r} is not a Gemma 4 assistant ({GGUF_ARCH})")
        self.architecture = arch
        self._tensors = self.file.tensors
        self._ours = {}
        for gguf_name in self._tensors:
            if gguf_name == ROPE_FREQS:
                continue
            ours = names.from_gguf(gguf_name)
            if ours is None:
                raise ModelLoadError(f"{gguf_name}: tensor not known for architecture {arch}")
            self._ours[ours] = gguf_name
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
