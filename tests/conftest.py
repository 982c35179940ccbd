import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.manual_seed(0)

from reference import GEMMA4_CONFIGS, build_gemma4  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def converted_cache(tmp_path_factory):
    """GGUF weights converted at load go to a folder of the session's (checkpoint/converted.py), not to ~/.cache."""
    import os

    os.environ["GEMMA4_CONVERTED"] = str(tmp_path_factory.mktemp("converted"))


@pytest.fixture(scope="session")
def gemma4_models(tmp_path_factory):
    """name -> (checkpoint folder, transformers model), built once per session."""
    built = {}
    for i, name in enumerate(GEMMA4_CONFIGS):
        path = tmp_path_factory.mktemp(name)
        built[name] = (path, build_gemma4(path, name, seed=i))
    return built


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """A tiny Gemma 4 (MoE, K=V) as an F32 GGUF with a small vocabulary: what the command-line tests run."""
    from gemma4.checkpoint import open_checkpoint
    from gemma4.checkpoint.gguf_writer import write_gguf
    from reference import tiny_vocab_metadata

    d = tmp_path_factory.mktemp("cli")
    build_gemma4(d / "hf", "moe_kv", seed=2)
    return write_gguf(open_checkpoint(d / "hf"), d / "tiny.gguf", "F32", tiny_vocab_metadata())


@pytest.fixture(scope="module")
def model_with_tokenizer(tmp_path_factory):
    """A tiny Gemma 4 with a byte-level tokenizer (text in and out), loaded once per test module."""
    import gemma4
    from reference import write_byte_tokenizer

    path = tmp_path_factory.mktemp("tok_model")
    build_gemma4(path, "moe_kv", seed=3)
    write_byte_tokenizer(path)
    return gemma4.load(path)


@pytest.fixture(scope="session")
def official_files():
    """Cache name -> path of the real Gemma 4 vocabulary and the official chat template (tests/official.py)."""
    import official

    try:
        return official.ensure()
    except official.Unavailable as e:
        pytest.skip(f"the official Gemma 4 files are needed: {e}")


@pytest.fixture(scope="session")
def official_template(official_files) -> str:
    """The official Gemma 4 chat template (google-gemma-4-31B-it.jinja as llama.cpp keeps it)."""
    return official_files["gemma4-31b-it.jinja"].read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def gemma4_tokenizer(official_files):
    """The real Gemma 4 tokenizer, built from llama.cpp's ggml-vocab-gemma-4.gguf."""
    from gemma4.checkpoint.gguf_file import GGUFFile
    from gemma4.tokenizer import Tokenizer

    return Tokenizer.from_gguf_metadata(GGUFFile(official_files["gemma4-vocab.gguf"]).metadata)


@pytest.fixture(scope="session")
def chat_gguf(tmp_path_factory):
    """A tiny Gemma 4 (MoE, K=V) GGUF whose vocabulary has Gemma 4's chat tokens (<|channel>, <|tool_call>,
    <|"|>, ...): what thinking and tool-call tests run."""
    from gemma4.checkpoint import open_checkpoint
    from gemma4.checkpoint.gguf_writer import write_gguf
    from reference import gemma4_vocab_metadata

    d = tmp_path_factory.mktemp("chat_gguf")
    build_gemma4(d / "hf", "moe_kv", seed=3)
    return write_gguf(open_checkpoint(d / "hf"), d / "g4.gguf", "F32", gemma4_vocab_metadata())


@pytest.fixture
def float_products(monkeypatch):
    """Parity of a float32 model part with the float32 reference is checked in the float32 mode: where the CPU has
    a matrix engine, the default runs a vision tower's products in bf16 (bounded against float32 in
    tests/native/test_matrix_engine.py)."""
    from gemma4.native import ops

    monkeypatch.setenv("GEMMA4_ACTIVATIONS", "float")
    monkeypatch.setattr(ops, "_activations", "float")
