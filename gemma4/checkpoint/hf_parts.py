"""A part of an HF checkpoint folder (a vision tower, an audio tower, an embedder) read as a checkpoint of its own:
its tensors found under our names across the folder's safetensors files, read on demand."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from ..errors import ModelLoadError


class HFPart:
    def __init__(self, files: list[Path], ours: Callable[[str], str | None],
                 unknown: Callable[[str], bool] | None = None, kind: str = "", missing: str = ""):
        """ours(key): our name of an HF tensor key, None where the key is not this part's; unknown(key): a key
        that belongs to the part by its prefix but has no name here (refused: "<key>: <kind> tensor not known");
        missing: the refusal where the folder holds none of the part's tensors."""
        from safetensors import safe_open

        self._where: dict[str, tuple[Path, str]] = {}
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    name = ours(key)
                    if name is not None:
                        self._where.setdefault(name, (path, key))
                    elif unknown is not None and unknown(key):
                        raise ModelLoadError(f"{key}: {kind + ' ' if kind else ''}tensor not known")
        if missing and not self._where:
            raise ModelLoadError(missing)

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        from safetensors import safe_open

        path, key = self._where[name]
        with safe_open(str(path), framework="pt") as f:
            return tuple(f.get_slice(key).get_shape())

    def tensor(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path, key = self._where[name]
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(key)


def tower_config(text_checkpoint, key: str, without: str) -> tuple[dict, dict | None]:
    """config.json's `key` section of a tower (refused where there is none: `without` says what such a model
    is) and the folder's processor_config.json (None where it has none)."""
    section = text_checkpoint.raw_config.get(key)
    if not isinstance(section, dict):
        raise ModelLoadError(f"{text_checkpoint.folder}: config.json has no {key} ({without})")
    return section, read_json(text_checkpoint.folder / "processor_config.json")


def read_json(path: Path) -> dict | None:
    """A JSON file beside the checkpoint (processor_config.json, ...), None where the folder has none."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from None
