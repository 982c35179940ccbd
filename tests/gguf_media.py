"""What the GGUF tests of the vision and audio towers share: the tiny GGUF vocabulary with Gemma 4's media
tokens where the HF tokenizer puts them, and llama.cpp's own `convert_hf_to_gguf.py --mmproj` run on a
tiny HF folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Mapping

import pytest

import official
from gemma4.checkpoint import open_checkpoint
from gemma4.checkpoint.gguf_writer import write_gguf
from gemma4.checkpoint.vision import HFVisionCheckpoint, write_mmproj
from gemma4.errors import ModelLoadError
from reference import tiny_vocab_metadata
from vision_reference import MEDIA_TOKENS, TOKEN_IDS, build_multimodal

# LLAMA_CPP_DIR, else the converter make test's preparation (tests/official.py) keeps from the llama-cpp-python sdist
_SOURCES = [os.environ.get("LLAMA_CPP_DIR", ""), str(official.converter_dir())]
LLAMA_CPP = next((Path(p) for p in _SOURCES if p and (Path(p) / "convert_hf_to_gguf.py").is_file()), None)
needs_converter = pytest.mark.skipif(LLAMA_CPP is None, reason="llama.cpp's converter not found (make official "
                                     "fetches it; or set LLAMA_CPP_DIR to a llama.cpp tree with convert_hf_to_gguf.py)")


def media_vocab_metadata(extra: Mapping[str, int] | None = None) -> dict:
    """tiny_vocab_metadata with Gemma 4's media and turn tokens (and `extra` text -> id) at the ids the HF
    tokenizer gives them (259..: byte tokens 0xFD-0xFF, never in UTF-8 text, and a few word pieces make room)."""
    meta = tiny_vocab_metadata()
    tokens, types = list(meta["tokenizer.ggml.tokens"]), list(meta["tokenizer.ggml.token_type"])
    for text, i in [*TOKEN_IDS.items(), *(extra or {}).items()]:
        tokens[i], types[i] = text, 3
    assert set(MEDIA_TOKENS) <= set(tokens)
    return {**meta, "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types}


def convert_mmproj(hf: Path, out: Path) -> Path:
    """The F32 mmproj llama.cpp's converter writes from the HF folder `hf` (whose processor_config.json gets
    an image mean and std, which the converter requires)."""
    proc = json.loads((hf / "processor_config.json").read_text())
    proc["image_processor"].update(image_mean=[0.0] * 3, image_std=[1.0] * 3)
    (hf / "processor_config.json").write_text(json.dumps(proc))
    r = subprocess.run([sys.executable, str(LLAMA_CPP / "convert_hf_to_gguf.py"), str(hf), "--mmproj",
                        "--outtype", "f32", "--outfile", str(out)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(LLAMA_CPP / "gguf-py")})
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def vision_gguf_pair(d: Path, metadata: dict | None = None) -> tuple[Path, Path]:
    """A tiny multimodal Gemma 4 (HF folder d/hf) as an F32 text GGUF with `metadata`'s vocabulary (default:
    media_vocab_metadata()) and the mmproj we write for its vision tower: (text.gguf, mmproj.gguf)."""
    build_multimodal(d / "hf", seed=5, bidirectional="vision")
    ckpt = open_checkpoint(d / "hf")
    text = write_gguf(ckpt, d / "text.gguf", "F32", metadata or media_vocab_metadata())
    return text, write_mmproj(HFVisionCheckpoint(ckpt), d / "mmproj.gguf")


def assert_mmproj_refusals(reader, mmproj: Path, text: Path) -> None:
    """An mmproj tower reader refuses a tower that projects to another width than the text model's, and a
    GGUF that is no mmproj."""
    with pytest.raises(ModelLoadError, match="projection_dim"):
        reader(mmproj, text_hidden_size=999)
    with pytest.raises(ModelLoadError, match="not an mmproj"):
        reader(text)
