"""LM Studio's models folder: ORG/NAME/ holding the GGUF files as downloaded (an mmproj beside them for
vision models), or an MLX / safetensors checkpoint. The folder is models/ in LM Studio's home (~/.lmstudio,
or where ~/.lmstudio-home-pointer says it moved), unless the app's settings.json moves it (downloadsFolder);
releases before 0.3 used ~/.cache/lm-studio/models. $LMSTUDIO_MODELS (ours, not LM Studio's) names another."""

from __future__ import annotations

import json
import os
from pathlib import Path

from . import hub
from .files import StoredModel, folder_models

SCHEME = "lmstudio://"


def _home() -> Path:
    pointer = Path.home() / ".lmstudio-home-pointer"
    try:
        moved = pointer.read_text(encoding="utf-8").strip()
        if moved:
            return Path(moved).expanduser()
    except OSError:
        pass
    return Path.home() / ".lmstudio"


def roots() -> list[Path]:
    home = _home()
    candidates = [home / "models", Path.home() / ".cache" / "lm-studio" / "models"]
    try:
        moved = json.loads((home / "settings.json").read_text(encoding="utf-8")).get("downloadsFolder")
        if isinstance(moved, str) and moved:
            candidates.insert(0, Path(moved).expanduser())
    except (OSError, ValueError, AttributeError):
        pass
    if os.environ.get("LMSTUDIO_MODELS"):
        candidates.insert(0, Path(os.environ["LMSTUDIO_MODELS"]).expanduser())
    out = []
    for c in candidates:
        if c.is_dir() and c.resolve() not in (o.resolve() for o in out):
            out.append(c)
    return out


def _models(name: str) -> list[StoredModel]:
    out = []
    for r in roots():
        folder = r / name
        if folder.is_dir():
            out += folder_models(folder, name, "lmstudio", SCHEME + name)
    return out


def find(name: str) -> list[StoredModel]:
    """ORG/NAME[:QUANT] (spelled as on the hub, where LM Studio downloads from)."""
    return hub.find_in(name, _models)


def find_explicit(rest: str) -> list[StoredModel]:
    """lmstudio://ORG/NAME/FILE or lmstudio://ORG/NAME[:QUANT]."""
    return hub.explicit_in(rest, SCHEME, _models)


def entries() -> list[StoredModel]:
    out = []
    for r in roots():
        for folder in sorted(p for p in r.glob("*/*") if p.is_dir()):
            out += folder_models(folder, folder.relative_to(r).as_posix(), "lmstudio",
                                 SCHEME + folder.relative_to(r).as_posix())
    return out
