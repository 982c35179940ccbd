"""An HF checkpoint folder (config.json + *.safetensors, single or sharded) -> config + named tensors.

Tensors are memory-mapped by `safetensors`; they are read when the model is built.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open

from ..config.text import ModelConfig
from ..errors import ModelLoadError
from . import names


class SafetensorsCheckpoint:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        config_path = self.folder / "config.json"
        if not config_path.is_file():
            raise ModelLoadError(f"{self.folder}: no config.json (not an HF checkpoint folder)")
        try:
            self.raw_config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{config_path}: not valid JSON ({e})") from None
        self.config = self._config(self.raw_config)
        self._files = self._shards()
        self._where: dict[str, tuple[Path, str]] = {}  # our name -> (file, name in file)
        for path in self._files:
            for key in self._open(path).keys():
                ours = self._our_name(key)
                if ours is not None:
                    self._where.setdefault(ours, (path, key))

    def _config(self, raw: dict):
        return ModelConfig.from_hf(raw)

    @staticmethod
    def _our_name(key: str) -> str | None:
        return _strip_prefix(key)

    def _shards(self) -> list[Path]:
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ModelLoadError(f"{index}: unreadable index ({e})") from None
            files = sorted({self.folder / f for f in weight_map.values()})
            for f in files:
                if not f.is_file():
                    raise ModelLoadError(f"{f}: shard named in the index is missing")
            return files
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"{self.folder}: no *.safetensors files")
        return files

    def _open(self, path: Path):
        try:
            return safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"{path.name}: unreadable safetensors file ({e})") from None

    @property
    def files(self) -> list[Path]:
        """The safetensors files of the checkpoint (the vision reader opens them too)."""
        return list(self._files)

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        path, key = self._where[name]
        return tuple(self._open(path).get_slice(key).get_shape())

    def tensor_types(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for path, key in self._where.values():
            dtype = self._open(path).get_slice(key).get_dtype()
            counts[dtype] = counts.get(dtype, 0) + 1
        return counts

    def weight_bytes(self) -> int:
        return sum(f.stat().st_size for f in self._files)

    def tensor(self, name: str) -> torch.Tensor:
        path, key = self._where[name]
        try:
            t = self._open(path).get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ModelLoadError(f"{name}: cannot read from {path.name} ({e})") from None
        return self._as_ours(name, t)

    def _as_ours(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if self.config.architecture == "gemma3" and names.is_norm(name):
            t = t.float() + 1.0  # Gemma 3 norms multiply by (1 + w)
        return t

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._where:
            yield name, self.tensor(name)

    def chat_template(self) -> str | None:
        """chat_template.jinja, else tokenizer_config.json's chat_template (a string or the "default"
        of a list of named templates)."""
        jinja = self.folder / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text()
        cfg_path = self.folder / "tokenizer_config.json"
        if not cfg_path.is_file():
            return None
        try:
            template = json.loads(cfg_path.read_text()).get("chat_template")
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{cfg_path}: not valid JSON ({e})") from None
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        return template if isinstance(template, str) else None

    def load_tokenizer(self):
        """The tokenizer from tokenizer.json, or None when the folder has none."""
        path = self.folder / "tokenizer.json"
        if not path.is_file():
            return None
        from ..tokenizer import Tokenizer
        return Tokenizer.from_file(path)


def _strip_prefix(key: str) -> str | None:
    """The text-model name of a checkpoint key, or None for other towers (vision, audio, ...)."""
    for prefix in names.HF_PREFIXES:
        if key.startswith(prefix):
            rest = key[len(prefix):]
            if rest.startswith(("embed_tokens.", "embed_tokens_per_layer.", "per_layer_model_projection.",
                                "per_layer_projection_norm.", "layers.", "norm.")) or rest == "lm_head.weight":
                return rest
    if key == "lm_head.weight":
        return key
    return None
