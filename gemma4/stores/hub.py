"""The Hugging Face hub cache, read as huggingface_hub writes it (transformers, `hf download`, `gemma4 pull`):
models--ORG--NAME/refs/main holds the revision, snapshots/<revision>/ the repository's files (links into
blobs/). A GGUF repository is named ORG/NAME[:QUANT], a checkpoint repository ORG/NAME."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .files import StoredModel, folder_models, select

SCHEME = "hf://"
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir() -> Path:
    """Where huggingface_hub keeps repositories, by the same variables it reads."""
    env = os.environ
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(var):
            return Path(env[var]).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def split_name(name: str) -> tuple[str, str | None] | None:
    """ORG/NAME[:QUANT] -> (repo, quant), or None when `name` is not spelled as a repository."""
    repo, _, quant = name.partition(":")
    if not _REPO.match(repo) or ".." in repo or (_ and not quant) or repo.lower().endswith((".gguf", ".safetensors")):
        return None
    return repo, quant or None


def repo_dir(repo: str) -> Path:
    return cache_dir() / ("models--" + repo.replace("/", "--"))


def snapshot(repo: str) -> Path | None:
    """The snapshot refs/main names, else the newest one; None when the repository is not cached."""
    root = repo_dir(repo)
    ref = root / "refs" / "main"
    if ref.is_file():
        snap = root / "snapshots" / ref.read_text().strip()
        if snap.is_dir():
            return snap
    snaps = [s for s in (root / "snapshots").glob("*") if s.is_dir()]
    return max(snaps, key=lambda s: s.stat().st_mtime) if snaps else None


def models_of(repo: str) -> list[StoredModel]:
    snap = snapshot(repo)
    return folder_models(snap, repo, "hf", SCHEME + repo) if snap is not None else []


def find_in(name: str, models_of) -> list[StoredModel]:
    """The models ORG/NAME[:QUANT] names among models_of(ORG/NAME) (several when it leaves the quant open): the
    hub cache's, and LM Studio's folder, which spells its models as the hub does."""
    parts = split_name(name)
    return select(models_of(parts[0]), parts[1]) if parts else []


def explicit_in(rest: str, scheme: str, models_of) -> list[StoredModel]:
    """SCHEME ORG/NAME/FILE (one file of the repository) or SCHEME ORG/NAME[:QUANT], `rest` following the scheme."""
    org, _, tail = rest.partition("/")
    repo_name, _, file = tail.partition("/")
    if not file:
        return find_in(rest, models_of)
    return [m for m in models_of(f"{org}/{repo_name}") if m.explicit == f"{scheme}{org}/{repo_name}/{file}"]


def find(name: str) -> list[StoredModel]:
    """The cached models ORG/NAME[:QUANT] names."""
    return find_in(name, models_of)


def find_explicit(rest: str) -> list[StoredModel]:
    """hf://ORG/NAME/FILE (one file of the snapshot) or hf://ORG/NAME[:QUANT]."""
    return explicit_in(rest, SCHEME, models_of)


def entries() -> list[StoredModel]:
    root = cache_dir()
    out = []
    for d in sorted(root.glob("models--*--*")) if root.is_dir() else []:
        org, _, name = d.name[len("models--"):].partition("--")
        out += models_of(f"{org}/{name}")
    return out
