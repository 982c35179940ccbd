"""Fetching a model from the Hugging Face Hub into the hub cache, where other tools find it too.

huggingface_hub does the transfer: resumable downloads, progress bars, HF_TOKEN for gated and private
repositories. This module only chooses the files: a GGUF repository's quant by name (Q4_K_M when none is
named), the projector beside it, or a checkpoint's config, tokenizer and safetensors."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from ..errors import ModelLoadError
from . import hub
from .files import StoredModel, is_checkpoint, model_ggufs, pick_mmproj, quant_of, with_quant

PREFERRED_QUANT = "Q4_K_M"  # the usual size/quality trade, and the quant Ollama's and LM Studio's defaults use
_CHECKPOINT_FILE = re.compile(r"^(config\.json|generation_config\.json|tokenizer[\w.]*|special_tokens_map\.json|"
                              r"chat_template\.(jinja|json)|(pre)?processor_config\.json|[\w.-]+\.safetensors"
                              r"(\.index\.json)?)$")


def _repo_files(repo: str) -> dict[str, int | None]:
    """The repository's files (path -> size in bytes) as the Hub lists them."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, OfflineModeIsEnabled, RepositoryNotFoundError

    try:
        return {f.path: getattr(f, "size", None) for f in HfApi().list_repo_tree(repo, recursive=True)
                if hasattr(f, "size")}
    except GatedRepoError:
        raise ModelLoadError(f"{repo} is gated: accept its terms on huggingface.co and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise ModelLoadError(f"{repo}: no such repository on the Hugging Face Hub (a private one needs "
                             f"HF_TOKEN)") from None
    except OfflineModeIsEnabled:
        raise ModelLoadError(offline_message(repo)) from None
    except Exception as e:  # the network: connection refused, DNS, TLS, timeouts (httpx's errors)
        raise ModelLoadError(f"{repo}: cannot reach the Hugging Face Hub ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from None


def _download(repo: str, filename: str) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo, filename, cache_dir=hub.cache_dir()))


def offline_message(name: str) -> str:
    return (f"{name} is not in the Hugging Face cache ({hub.cache_dir()}) and HF_HUB_OFFLINE is set: "
            f"run `gemma4 pull {name}` where the network is, or unset HF_HUB_OFFLINE")


def choose(files: dict[str, int | None], repo: str, quant: str | None) -> tuple[list[str], str]:
    """The files to fetch from a repository's listing (path -> size), the model first, and what they make
    (ORG/NAME:QUANT). Raises ModelLoadError, listing the choices, where the name does not settle it."""
    names = list(files)
    ggufs = model_ggufs(names)
    if ggufs:
        if quant is not None:
            chosen = with_quant(ggufs, quant)
            if len(chosen) != 1:
                raise ModelLoadError(f"{repo}:{quant}: {'several' if chosen else 'no'} GGUF files match; the "
                                     f"repository has {', '.join(chosen or ggufs)}")
            model = chosen[0]
        elif len(ggufs) == 1:
            model = ggufs[0]
        elif len(with_quant(ggufs, PREFERRED_QUANT)) == 1:
            model = with_quant(ggufs, PREFERRED_QUANT)[0]
        else:  # no Q4_K_M: the smallest file
            model = min(ggufs, key=lambda n: (files.get(n) or 0, n))
        mmproj = pick_mmproj(names, {n: s or 0 for n, s in files.items()})
        label = f"{repo}:{quant_of(model)}" if quant_of(model) else f"{hub.SCHEME}{repo}/{model}"
        return [model] + ([mmproj] if mmproj else []), label
    if is_checkpoint(names):
        if quant is not None:
            raise ModelLoadError(f"{repo} is a safetensors checkpoint: it has no quants to choose (drop "
                                 f"':{quant}'; `--quantize int4` quantises at load)")
        return sorted(n for n in names if "/" not in n and _CHECKPOINT_FILE.match(n)), repo
    raise ModelLoadError(f"{repo} holds neither GGUF files nor a checkpoint (config.json and safetensors)")


def _one_file(files: dict[str, int | None], repo: str, file: str) -> tuple[list[str], str]:
    """hf://ORG/NAME/FILE: that file (and the repository's mmproj beside a GGUF)."""
    if file not in files:
        raise ModelLoadError(f"{repo} has no file {file!r}")
    mmproj = pick_mmproj(list(files), {n: s or 0 for n, s in files.items()}) if file.endswith(".gguf") else None
    return [file] + ([mmproj] if mmproj and mmproj != file else []), f"{hub.SCHEME}{repo}/{file}"


def pull(name: str, note: Callable[[str], None] = lambda _: None) -> StoredModel:
    """Downloads ORG/NAME[:QUANT] or hf://ORG/NAME/FILE (what is cached already is not fetched again) and
    returns the model."""
    rest = name.removeprefix(hub.SCHEME)
    org, _, tail = rest.partition("/")
    repo_name, _, file = tail.partition("/")
    parts = hub.split_name(f"{org}/{repo_name}" if file else rest)
    if parts is None or (file and parts[1]):
        raise ModelLoadError(f"{name}: a Hugging Face repository is named ORG/NAME, or ORG/NAME:QUANT for a "
                             f"quant of a GGUF repository, or hf://ORG/NAME/FILE for one file")
    repo, quant = parts
    if hub.offline():
        raise ModelLoadError(offline_message(name))
    files = _repo_files(repo)
    chosen, label = _one_file(files, repo, file) if file else choose(files, repo, quant)
    picked = not file and quant is None and len(model_ggufs(list(files))) > 1
    note(f"pulling {label}" + (f" (chose {quant_of(chosen[0]) or chosen[0]} of the repository's "
                               f"{len(model_ggufs(list(files)))} GGUF files; name another as {repo}:QUANT)"
                               if picked else "") + f" into {hub.cache_dir()}")
    try:
        paths = [_download(repo, f) for f in chosen]
    except ModelLoadError:
        raise
    except Exception as e:  # network or disk, mid-transfer: a rerun resumes
        raise ModelLoadError(f"{label}: download failed ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else 'no detail'}); run it again to resume") from None
    if chosen[0].endswith(".gguf"):
        return StoredModel(label, paths[0], "gguf", paths[0].stat().st_size, "hf", f"{hub.SCHEME}{repo}/{chosen[0]}",
                           quant_of(chosen[0]), paths[1] if len(paths) > 1 else None)
    folder = paths[chosen.index("config.json")].parent
    return StoredModel(repo, folder, "hf", sum(p.stat().st_size for p in paths), "hf", hub.SCHEME + repo)
