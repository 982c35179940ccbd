"""What the files of one model folder are (a hub snapshot, an LM Studio folder): which GGUF is a model and
which a vision projector (mmproj), a GGUF's quant read from its file name, an HF checkpoint folder."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

# a quant as llama.cpp's tools name files: Q4_K_M, IQ4_XS, Q8_0, BF16, F16, F32, MXFP4, TQ1_0
_QUANT = re.compile(r"(?i)^(i?q\d+(_[a-z0-9]+)*|tq\d+_\d+|b?f16|f32|fp16|fp32|mxfp4)$")
# projector precisions, best first: the tower is small, so the most exact one is worth its size
_MMPROJ_PREFERENCE = ("f16", "bf16", "f32")


@dataclass
class StoredModel:
    name: str  # how `gemma4 list` shows it and `-m` takes it
    path: Path  # the GGUF file, or the HF checkpoint folder
    kind: str  # "gguf" or "hf"
    size: int
    source: str = "gemma4"  # where it was found: gemma4, ollama, hf, lmstudio, embedded, path
    explicit: str = ""  # the name no other model shares (hf://…, ollama://…, lmstudio://…, a path)
    quant: str | None = None  # a GGUF's quant, from its file name (Ollama: from its config)
    mmproj: Path | None = None  # the vision projector the store keeps beside the model
    params: dict = field(default_factory=dict)  # Ollama's sampling defaults (its params layer)

    def __post_init__(self):
        self.explicit = self.explicit or str(self.path)


def is_mmproj(name: str) -> bool:
    return "mmproj" in Path(name).name.lower()


def _tokens(name: str) -> list[str]:
    stem = Path(name).name
    if stem.lower().endswith(".gguf"):
        stem = stem[:-5]
    return re.split(r"[-.]", stem)


def quant_of(name: str) -> str | None:
    """The quant a GGUF file's name carries (its last token that looks like one), or None."""
    for token in reversed(_tokens(name)):
        if _QUANT.match(token):
            return token.upper()
    return None


def with_quant(names: list[str], quant: str) -> list[str]:
    """The names carrying `quant` (case-insensitive): as a whole token of the name where any does, else
    anywhere in it."""
    q = quant.lower()
    whole = [n for n in names if q in (t.lower() for t in _tokens(n))]
    return whole or [n for n in names if q in Path(n).name.lower()]


def model_ggufs(names: list[str]) -> list[str]:
    return sorted(n for n in names if n.lower().endswith(".gguf") and not is_mmproj(n))


def pick_mmproj(names: list[str], sizes: dict[str, int] | None = None) -> str | None:
    """The projector to use among a folder's files: F16, else BF16, else F32, else the smallest."""
    projectors = sorted(n for n in names if n.lower().endswith(".gguf") and is_mmproj(n))
    for precision in _MMPROJ_PREFERENCE:
        for n in projectors:
            if (quant_of(n) or "").lower() == precision:
                return n
    if not projectors:
        return None
    return min(projectors, key=lambda n: ((sizes or {}).get(n) or 0, n))


def is_checkpoint(names: list[str]) -> bool:
    """An HF checkpoint: config.json and safetensors weights at the top of the folder."""
    top = {n for n in names if "/" not in n}
    return "config.json" in top and any(n.endswith(".safetensors") for n in top)


def folder_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def folder_models(folder: Path, name: str, source: str, explicit: str) -> list[StoredModel]:
    """The models in one folder named `name` (ORG/NAME): its checkpoint, and each of its model GGUFs (named
    NAME:QUANT where the folder holds several), each with the folder's projector."""
    names = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    out = []
    if is_checkpoint(names):
        out.append(StoredModel(name, folder, "hf", folder_size(folder), source, explicit))
    ggufs = model_ggufs(names)
    mmproj = pick_mmproj(names)
    for g in ggufs:
        quant = quant_of(g)
        shown = f"{name}:{quant}" if len(ggufs) > 1 and quant else (name if len(ggufs) == 1 else f"{explicit}/{g}")
        path = folder / g
        out.append(StoredModel(shown, path, "gguf", path.stat().st_size, source, f"{explicit}/{g}", quant,
                               folder / mmproj if mmproj else None))
    return out


def select(models: list[StoredModel], quant: str | None) -> list[StoredModel]:
    """The models of one folder a name asks for: all of them, or the GGUFs carrying `quant`."""
    if quant is None:
        return models
    ggufs = {m.path.name: m for m in models if m.kind == "gguf"}
    return [ggufs[n] for n in with_quant(list(ggufs), quant)]
