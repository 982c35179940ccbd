"""Prompt-cache files: a document's KV saved to disk, reloaded by a later run instead of a prefill.

A file is a Snapshot (prefix.py) in safetensors (tensors "LAYER.NAME") with JSON metadata: the format and
its version, the package version, a fingerprint of the model (config, every tensor's name, shape and
dtype, and a few sampled values of each, so a model of the same shape with other weights is refused),
the KV storage type and the token ids (prefix.prompt_key: an image's soft tokens keyed by its
embeddings). Files are written to a temporary name and renamed: a reader
never sees half a file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from .prefix import Snapshot

FORMAT = "gemma4-prompt-cache"
VERSION = 2  # 2: saved at a chunk end of the prefill grid (engine.runner.chunk_end), resumed only there


def _package_version() -> str:
    from .. import __version__

    return __version__


def fingerprint(decoder) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(dataclasses.asdict(decoder.config), sort_keys=True, default=str).encode())
    for name, t in sorted(decoder.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        try:
            flat = t.detach().reshape(-1)
            step = max(1, flat.numel() // 16)
            h.update(flat[::step][:16].float().cpu().numpy().tobytes())
        except (RuntimeError, TypeError, NotImplementedError):  # a packed type: its name and shape only
            pass
    return h.hexdigest()


def save(path: str | Path, snap: Snapshot, decoder) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {f"{i}.{name}": t.contiguous() for i, layer in enumerate(snap.layers) for name, t in layer.items()}
    meta = {"format": FORMAT, "version": str(VERSION), "package_version": _package_version(),
            "fingerprint": fingerprint(decoder), "kv_dtype": snap.kv_dtype, "window": str(snap.window),
            "layers": str(len(snap.layers)), "tokens": json.dumps(snap.tokens)}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load(path: str | Path, decoder, kv_dtype: str = "float") -> Snapshot:
    """The snapshot in `path`; ValueError (one line, naming the file) if it is not one for this model."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"prompt cache {path}: not a prompt-cache file")
            if meta.get("version") != str(VERSION) or meta.get("package_version") != _package_version():
                raise ValueError(f"prompt cache {path}: written by another version (format {meta.get('version')}, "
                                 f"gemma4 {meta.get('package_version')}); delete it to make a new one")
            if meta.get("fingerprint") != fingerprint(decoder):
                raise ValueError(f"prompt cache {path}: made with another model; delete it or use another file")
            if meta.get("kv_dtype") != kv_dtype:
                raise ValueError(f"prompt cache {path}: holds a {meta.get('kv_dtype')} KV cache, this run uses "
                                 f"{kv_dtype}")
            layers: list[dict[str, torch.Tensor]] = [{} for _ in range(int(meta["layers"]))]
            for key in f.keys():
                i, name = key.split(".", 1)
                layers[int(i)][name] = f.get_tensor(key)
            return Snapshot(json.loads(meta["tokens"]), layers, int(meta["window"]), meta["kv_dtype"])
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"prompt cache {path}: not a readable prompt-cache file ({type(e).__name__})") from None

