"""Ollama's store, read as `ollama pull` writes it ($OLLAMA_MODELS, else ~/.ollama/models):
manifests/HOST/NAMESPACE/NAME/TAG is a JSON manifest whose layers name blobs/sha256-<hex> by media type:
the model GGUF, its template (a Go template: not ours to render; the GGUF carries its own), its sampling
parameters (JSON), and a vision projector where the model has one. `gemma3:270m` is
registry.ollama.ai/library/gemma3/270m, `NAME` is NAME:latest, `user/NAME:TAG` another namespace."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .files import StoredModel

SCHEME = "ollama://"
HOST = "registry.ollama.ai"
_MEDIA = "application/vnd.ollama.image."


def root() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or "~/.ollama/models").expanduser()


def split_name(name: str) -> tuple[str, str, str, str] | None:
    """[HOST/][NAMESPACE/]NAME[:TAG] -> (host, namespace, name, tag), or None when not spelled so."""
    base, tag = name, "latest"
    if ":" in name.rsplit("/", 1)[-1]:
        base, _, tag = name.rpartition(":")
    parts = base.split("/")
    if len(parts) == 1:
        parts = [HOST, "library", *parts]
    elif len(parts) == 2:
        parts = [HOST, *parts]
    if len(parts) != 3 or not all(parts) or not tag or any(p in (".", "..") for p in (*parts, tag)):
        return None
    return parts[0], parts[1], parts[2], tag


def shown(host: str, namespace: str, name: str, tag: str) -> str:
    """The name as `ollama list` prints it."""
    if host != HOST:
        return f"{host}/{namespace}/{name}:{tag}"
    return f"{name}:{tag}" if namespace == "library" else f"{namespace}/{name}:{tag}"


def _blob(digest: str) -> Path:
    blobs = root() / "blobs"
    path = blobs / digest.replace(":", "-")
    return path if path.exists() else blobs / digest  # older releases kept the ':'


def read_manifest(path: Path, name: str) -> StoredModel | None:
    """The model a manifest describes; None when it holds no GGUF (a safetensors-layer model, a broken file)."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        layers = {layer["mediaType"]: layer for layer in manifest.get("layers", [])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    model = layers.get(_MEDIA + "model")
    if model is None or not _blob(model["digest"]).is_file():
        return None
    params, quant = {}, None
    if _MEDIA + "params" in layers:
        try:
            params = json.loads(_blob(layers[_MEDIA + "params"]["digest"]).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            params = {}
    try:  # the config blob says the quant: {"model_format": "gguf", "file_type": "Q4_K_M", ...}
        quant = json.loads(_blob(manifest["config"]["digest"]).read_text(encoding="utf-8")).get("file_type")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    projector = layers.get(_MEDIA + "projector")
    mmproj = _blob(projector["digest"]) if projector else None
    size = sum(int(layer.get("size", 0)) for layer in layers.values())
    return StoredModel(name, _blob(model["digest"]), "gguf", size, "ollama", SCHEME + name, quant,
                       mmproj if mmproj is not None and mmproj.is_file() else None,
                       params if isinstance(params, dict) else {})


def find(name: str) -> list[StoredModel]:
    parts = split_name(name)
    if parts is None:
        return []
    model = read_manifest(root().joinpath("manifests", *parts), shown(*parts))
    return [model] if model is not None else []


def entries() -> list[StoredModel]:
    manifests = root() / "manifests"
    out = []
    for path in sorted(manifests.glob("*/*/*/*")) if manifests.is_dir() else []:
        if path.is_file():
            model = read_manifest(path, shown(*path.relative_to(manifests).parts))
            if model is not None:
                out.append(model)
    return out
