"""Text <-> token ids, from an HF tokenizer.json or from the vocabulary a GGUF file carries.

The `tokenizers` library does the work; this module only builds its pipeline the way llama.cpp reads a
GGUF vocabulary, so that the ids agree with llama.cpp's:

- `tokenizer.ggml.model` "llama" (Gemma 3): SentencePiece BPE driven by token scores. Spaces become
  U+2581, the text is not pre-split, the best-scoring adjacent pair is merged first, and characters no
  token covers fall back to `<0xXX>` byte tokens. The merge list it implies is rebuilt from the scores.
- "gemma4": the same shape with an explicit merge list, the text split only at newline runs.
- "gpt2": byte-level BPE with a merge list and a pre-tokenizer regex named by `tokenizer.ggml.pre`.

Control and user-defined tokens are matched whole in the text before anything else, as llama.cpp does
with parse_special; control tokens are the "special" ones that decode(skip_special_tokens=True) drops.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend

# tokenizer.ggml.token_type values
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

SPACE = "\u2581"
_NEWLINE_RUNS = re.compile(r"(\n+)")
# Tokens that end the model's part of a turn, looked up by text: Gemma 3 and Gemma 4 turn ends, and
# Gemma 4's `<|tool_response>`, which the model writes after its tool calls to wait for the results.
END_OF_TURN_TEXTS = ("<end_of_turn>", "<turn|>", "<|tool_response>")

# Pre-tokenizer regexes of byte-level vocabularies, by `tokenizer.ggml.pre` (as the models'
# tokenizer.json files spell them); None is GPT-2's own, built into the ByteLevel pre-tokenizer.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_BYTE_LEVEL_SPLITS = {"gpt-2": None, "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT}
# llama.cpp looks a whole pre-tokenized word up before merging for these
_IGNORE_MERGES = {"llama-bpe", "llama3", "llama-v3"}


class Tokenizer:
    def __init__(self, backend: Backend, *, bos_token_id: int | None, eos_token_id: int | None,
                 pad_token_id: int | None = None, add_bos: bool = True, whole_newline_runs: bool = False):
        self._backend = backend
        self.add_bos = add_bos and bos_token_id is not None
        # llama.cpp's gemma4 rule: a run of newlines that is a token stays whole, whatever the merges say
        self._whole_newline_runs = whole_newline_runs
        self._bos, self._eos, self._pad = bos_token_id, eos_token_id, pad_token_id
        added = backend.get_added_tokens_decoder()
        self._special = frozenset(i for i, t in added.items() if t.special)
        self._byte_ids = frozenset(i for i in (backend.token_to_id(f"<0x{b:02X}>") for b in range(256)) if i is not None)
        if self.vocab_size == 0:
            raise ValueError("tokenizer: empty vocabulary")

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        """An HF tokenizer.json (or the folder holding it); bos/eos and add_bos_token come from
        tokenizer_config.json beside it when there is one."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        try:
            backend = Backend.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception for unreadable JSON
            raise ValueError(f"{path}: cannot read tokenizer ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        config = _read_json(path.with_name("tokenizer_config.json"))

        def token_id(name: str) -> int | None:
            token = config.get(name)
            if isinstance(token, dict):
                token = token.get("content")
            return backend.token_to_id(token) if isinstance(token, str) else None

        bos_from_template = _bos_added_by_post_processor(backend)
        bos = token_id("bos_token")
        if bos is None:
            bos = bos_from_template if bos_from_template is not None else _first_present(backend, ("<bos>", "<s>"))
        eos = token_id("eos_token")
        if eos is None:
            eos = _first_present(backend, ("<eos>", "</s>", "<|endoftext|>"))
        add_bos = config.get("add_bos_token")
        if not isinstance(add_bos, bool):
            add_bos = bos_from_template is not None
        return cls(backend, bos_token_id=bos, eos_token_id=eos, pad_token_id=token_id("pad_token"), add_bos=add_bos)

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], cache=None) -> "Tokenizer":
        """The tokenizer a GGUF file describes, from its metadata (key -> value, as gguf's
        ReaderField.contents() gives them). cache(kind, build): a derived value of this file, kept across
        processes (filecache.cached bound to the file): here the parts the tokenizer is built from (the
        vocabulary made unique, its merges, its special tokens), which take seconds to derive."""
        if cache is None:
            return cls._from_parts(_gguf_parts(meta))
        return cls._from_parts(cache(CACHE_KIND, lambda: _gguf_parts(meta)))

    @classmethod
    def _from_parts(cls, parts: dict) -> "Tokenizer":
        tokens = parts["tokens"]
        vocab = dict(zip(tokens, range(len(tokens))))
        if parts["model"] == "sentencepiece":
            backend = _sentencepiece_bpe(vocab, parts["merges"], unk=parts["unk"],
                                         add_space_prefix=parts["add_space_prefix"],
                                         split_newlines=parts["split_newlines"])
        else:
            backend = _byte_level_bpe(vocab, parts["merges"], parts["pre"])
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in parts["special"]])
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in parts["user"]])
        return cls(backend, bos_token_id=parts["bos"], eos_token_id=parts["eos"], pad_token_id=parts["pad"],
                   add_bos=parts["add_bos"], whole_newline_runs=parts["whole_newline_runs"])

    # ---- text <-> ids -----------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, special tokens in it matched whole; BOS first when the model asks for
        it, add_special_tokens is set and the text does not start with it already. EOS is never appended."""
        if self._whole_newline_runs:
            ids = []
            for piece in _NEWLINE_RUNS.split(text):
                whole = self._backend.token_to_id(piece) if piece.startswith("\n") else None
                ids += [whole] if whole is not None else self._encode(piece)
        else:
            ids = self._encode(text)
        if add_special_tokens and self.add_bos and ids[:1] != [self._bos]:  # a text starting with <bos> has its own
            ids.insert(0, self._bos)
        return ids

    def _encode(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids if text else []

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def stream(self, skip_special_tokens: bool = False) -> "StreamDecoder":
        """An incremental decoder: push ids one at a time, get the text that is safe to show."""
        return StreamDecoder(self, skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    # ---- facts ------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._bos

    @property
    def eos_token_id(self) -> int | None:
        return self._eos

    @property
    def pad_token_id(self) -> int | None:
        return self._pad

    @property
    def special_token_ids(self) -> set[int]:
        """Control tokens: matched whole in text, dropped by decode(skip_special_tokens=True)."""
        return set(self._special)

    @property
    def byte_token_ids(self) -> set[int]:
        return set(self._byte_ids)

    @property
    def stop_token_ids(self) -> set[int]:
        """EOS and the end-of-turn tokens this vocabulary has."""
        ids = {self.token_to_id(t) for t in END_OF_TURN_TEXTS} | {self._eos}
        return {i for i in ids if i is not None}


class StreamDecoder:
    """Text of a growing id sequence, piece by piece; all pieces joined equal decode(all ids).

    Each push decodes a short window of recent ids and hands out what the window adds to the text
    already shown. Text is held back while it may be incomplete: after a byte-fallback token (the
    library decodes a run of them as one UTF-8 string, so the run is decoded once it has ended) and
    while the text ends in U+FFFD (a byte-level token that stops inside a character).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the window: the ids before it are shown and no longer needed
        self._read = 0  # ids up to here are shown

    def push(self, token_id: int) -> str:
        token_id = int(token_id)
        self._ids.append(token_id)
        if token_id in self._tokenizer._byte_ids:
            return ""
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        decode = self._tokenizer.decode
        shown = decode(self._ids[self._prefix:self._read], self._skip)
        text = decode(self._ids[self._prefix:], self._skip)
        if not final and (len(text) <= len(shown) or text.endswith("\ufffd")):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(shown):]


# ---- the parts a GGUF vocabulary gives ----------------------------------------------------------
CACHE_KIND = "tokenizer-parts-1"  # the cache entry's name: renamed when what _gguf_parts returns changes


def _gguf_parts(meta: Mapping[str, Any]) -> dict:
    """What the tokenizer is built from, as plain data (a cache entry holds it): the vocabulary made unique,
    the merges (sharing the vocabulary's strings, so that the entry stores each once), the model's options,
    the special and user-defined tokens, and the facts the Tokenizer keeps."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = list(meta.get("tokenizer.ggml.tokens") or ())
    if not tokens:
        raise ValueError("GGUF metadata: empty or missing vocabulary (tokenizer.ggml.tokens)")
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise ValueError(f"GGUF metadata: {len(types)} token types for {len(tokens)} tokens")
    tokens = _unique(tokens)

    def special_id(key: str, default: int | None) -> int | None:
        value = meta.get(f"tokenizer.ggml.{key}", default)
        return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

    def unk_of(unk_id: int | None) -> str | None:
        return tokens[unk_id] if unk_id is not None else None

    parts: dict[str, Any] = dict(model="sentencepiece", add_space_prefix=False, split_newlines=False, pre=None,
                                 unk=None, add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)),
                                 whole_newline_runs=False)
    if kind == "llama":
        scores = list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
        parts.update(merges=_merges_from_scores(tokens, scores, types), unk=unk_of(special_id("unknown_token_id", 0)),
                     add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
                     bos=special_id("bos_token_id", 1), eos=special_id("eos_token_id", 2))
    elif kind == "gemma4":
        # add_bos as llama.cpp: the file may say otherwise, but a prompt must start with <bos>.
        # The newline runs are cut out before special tokens are matched: safe while none holds a newline.
        parts.update(merges=_merges_from_list(meta), unk=unk_of(special_id("unknown_token_id", None)),
                     split_newlines=True, bos=special_id("bos_token_id", None),
                     eos=special_id("eos_token_id", None), add_bos=True,
                     whole_newline_runs=not any("\n" in t and t.strip("\n") for t, ty in zip(tokens, types)
                                                if ty in (CONTROL, UNKNOWN, USER_DEFINED)))
    elif kind == "gpt2":
        pre = meta.get("tokenizer.ggml.pre")
        if pre not in _BYTE_LEVEL_SPLITS:
            raise ValueError(f"GGUF metadata: pre-tokenizer {pre!r} of a gpt2 vocabulary is not supported "
                             f"({', '.join(_BYTE_LEVEL_SPLITS)})")
        parts.update(model="byte_level", merges=_merges_from_list(meta), pre=pre, bos=special_id("bos_token_id", None),
                     eos=special_id("eos_token_id", None),
                     add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)))
    else:
        raise ValueError(f"GGUF metadata: tokenizer model {kind!r} is not supported (llama, gemma4, gpt2)")
    same = dict(zip(tokens, tokens))
    parts["merges"] = [(same.get(a, a), same.get(b, b)) for a, b in parts["merges"]]
    parts.update(tokens=tokens, pad=special_id("padding_token_id", None),
                 special=[t for t, ty in zip(tokens, types) if ty in (CONTROL, UNKNOWN)],
                 user=[t for t, ty in zip(tokens, types) if ty == USER_DEFINED])
    return parts


# ---- building the backend -------------------------------------------------------------------
def _sentencepiece_bpe(vocab: dict[str, int], merges: list[tuple[str, str]], *, unk: str | None,
                       add_space_prefix: bool, split_newlines: bool = False) -> Backend:
    backend = Backend(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    steps = [normalizers.Prepend(SPACE)] if add_space_prefix else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPACE)])
    if split_newlines:
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n+"), behavior="isolated")
    steps = [decoders.Strip(" ", 1, 0)] if add_space_prefix else []
    backend.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), *steps])
    return backend


def _byte_level_bpe(vocab: dict[str, int], merges: list[tuple[str, str]], pre: str) -> Backend:
    backend = Backend(models.BPE(vocab, merges, ignore_merges=pre in _IGNORE_MERGES))
    split = _BYTE_LEVEL_SPLITS[pre]
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    backend.decoder = decoders.ByteLevel()
    return backend


def _merges_from_scores(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """The merges a score-driven SentencePiece BPE performs, as a rank list: every split of a normal
    token into two normal tokens, the best-scoring token's splits first (ties: the lower id)."""
    normal = {t for t, ty in zip(tokens, types) if ty == NORMAL}
    candidates = (i for i, t in enumerate(tokens) if types[i] == NORMAL and len(t) > 1)
    merges = []
    for i in sorted(candidates, key=scores.__getitem__, reverse=True):  # stable: equal scores keep id order
        t = tokens[i]
        for k in range(1, len(t)):
            left = t[:k]
            if left in normal:
                right = t[k:]
                if right in normal:
                    merges.append((left, right))
    return merges


def _merges_from_list(meta: Mapping[str, Any]) -> list[tuple[str, str]]:
    merges = meta.get("tokenizer.ggml.merges")
    if not merges:
        raise ValueError(f"GGUF metadata: a {meta.get('tokenizer.ggml.model')} vocabulary needs tokenizer.ggml.merges")
    out = []
    for merge in merges:
        cut = merge.find(" ", 1)  # as llama.cpp: the first part is never empty
        if cut > 0:
            out.append((merge[:cut], merge[cut + 1:]))
    return out


def _unique(tokens: list[str]) -> list[str]:
    """Token texts as the library needs them: an empty or repeated text gets a placeholder
    (llama.cpp names empty ones the same way)."""
    seen: set[str] = set()
    out = []
    for i, t in enumerate(tokens):
        if not t or t in seen:
            t = f"[EMPTY_{i}]" if not t else f"[DUPLICATE_{i}]"
        seen.add(t)
        out.append(t)
    return out


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _bos_added_by_post_processor(backend: Backend) -> int | None:
    """The id the tokenizer.json post-processor puts first, if it puts one there."""
    plain = backend.encode("a", add_special_tokens=False).ids
    full = backend.encode("a", add_special_tokens=True).ids
    return full[0] if len(full) > len(plain) and full[1:1 + len(plain)] == plain else None


def _first_present(backend: Backend, texts: Iterable[str]) -> int | None:
    return next((i for i in (backend.token_to_id(t) for t in texts) if i is not None), None)
