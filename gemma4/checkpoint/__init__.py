"""Checkpoint readers: a path on disk -> config + named tensors (+ tokenizer sources)."""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelLoadError

GGUF_MAGIC = b"GGUF"


def open_checkpoint(path: str | Path):
    """An HF folder (config.json + safetensors) or a GGUF file."""
    path = Path(path).expanduser()
    if path.is_dir():
        from .safetensors import SafetensorsCheckpoint
        return SafetensorsCheckpoint(path)
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == GGUF_MAGIC:
            from .gguf import GGUFCheckpoint
            return GGUFCheckpoint(path)
        if path.suffix == ".gguf":
            raise ModelLoadError(f"{path}: not a GGUF file (bad magic {magic!r})")
        if path.name == "config.json" or path.suffix == ".safetensors":
            from .safetensors import SafetensorsCheckpoint
            return SafetensorsCheckpoint(path.parent)
        raise ModelLoadError(f"{path}: not a model (expected a GGUF file or an HF checkpoint folder)")
    raise ModelLoadError(f"{path}: no such file or folder")
