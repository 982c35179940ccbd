"""Constrained decoding for OpenAI's `response_format`: the sampled text always parses as JSON and,
for `json_schema`, validates against the schema. Other grammars (tool_grammar.py's forced calls) come
in through constraint_from_grammar.

llguidance does the grammar work: it compiles a JSON schema to a grammar and, at each step, gives the
set of token ids that keep the text a prefix of some valid document. This module turns our Tokenizer
into llguidance's view of the vocabulary (the bytes of every token), once per tokenizer, and wraps
one request's matcher behind three calls the scheduler makes per step: mask_logits, accept, done.
"""

from __future__ import annotations

import threading
import weakref

import llguidance
import numpy as np
import torch

from .tokenizer import SPACE

# Whitespace between JSON tokens: a space, or one or two newlines and at most 20 spaces or tabs of
# indentation (llama.cpp's JSON grammars allow the same), so that a model that favours whitespace can
# neither fill max_tokens with blank lines nor with a run of spaces, while compact and pretty-printed
# documents (indentation ten levels deep at two spaces) both stay allowed.
WHITESPACE_GAP = r"\x20|\x0A{1,2}[\x20\x09]{0,20}"
_JSON_OPTIONS = {"whitespace_pattern": WHITESPACE_GAP}
_GPT2_SPACE = "\u0120"  # "Ġ": a space in a byte-level BPE vocabulary


def constraint_from_response_format(response_format: dict | None, tokenizer) -> "GrammarConstraint | None":
    """The constraint a request's `response_format` asks for: None for None / {"type": "text"}.

    Raises ValueError (one line, naming the field) for an unknown type, a missing or invalid schema,
    or a schema llguidance cannot compile."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise ValueError(f"response_format must be an object, got {type(response_format).__name__}")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema = {"type": "object"}
    elif kind == "json_schema":
        schema = _schema_of(response_format.get("json_schema"))
    else:
        raise ValueError(f"response_format.type must be one of text, json_object, json_schema; got {kind!r}")
    # `strict` is accepted but changes nothing: every schema is enforced
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
    except (ValueError, TypeError) as e:  # a schema that does not serialize as JSON
        raise ValueError(f"response_format.json_schema.schema: not a JSON schema ({_one_line(str(e))})") from None
    return _constraint(grammar, tokenizer, "response_format.json_schema.schema" if kind == "json_schema"
                       else "response_format")


def constraint_from_grammar(lark: str, tokenizer, field: str) -> "GrammarConstraint":
    """The constraint of a grammar in llguidance's Lark syntax (chat tokens as `<[id]>`); ValueError
    naming `field` when it does not compile."""
    return _constraint(llguidance.LLMatcher.grammar_from_lark(lark), tokenizer, field)


def _constraint(grammar: str, tokenizer, field: str) -> "GrammarConstraint":
    vocabulary = vocabulary_of(tokenizer)
    matcher = llguidance.LLMatcher(vocabulary, grammar, log_level=0)
    if matcher.is_error():
        raise ValueError(f"{field}: cannot be used to constrain decoding ({_one_line(matcher.get_error())})")
    return GrammarConstraint(matcher, vocabulary.vocab_size)


def _schema_of(json_schema) -> dict:
    """The schema inside OpenAI's json_schema object, its other fields checked as OpenAI does."""
    if not isinstance(json_schema, dict):
        raise ValueError("response_format.json_schema must be an object with name and schema")
    name = json_schema.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("response_format.json_schema.name must be a non-empty string")
    strict = json_schema.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise ValueError(f"response_format.json_schema.strict must be a boolean, got {strict!r}")
    schema = json_schema.get("schema")
    if schema is None:
        raise ValueError("response_format.json_schema.schema is missing")
    if not isinstance(schema, dict):
        raise ValueError(f"response_format.json_schema.schema must be an object, got {type(schema).__name__}")
    return schema


class GrammarConstraint:
    """One request's grammar state. Per step: mask the logits, sample, accept the token; stop when
    `done` (or when the sampled token is a stop token, which the mask allows only once the JSON is
    complete)."""

    def __init__(self, matcher: "llguidance.LLMatcher", vocab_size: int):
        self._matcher = matcher
        self._vocab_size = vocab_size
        self._bits = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)
        self._blocked: np.ndarray | None = None  # the current state's disallowed ids

    def allowed(self) -> torch.Tensor:
        """bool [tokenizer vocab]: the ids that may come next."""
        return torch.from_numpy(~self._disallowed())

    def _disallowed(self) -> np.ndarray:
        """bool [tokenizer vocab], computed once per grammar state."""
        if self._blocked is None:
            self._matcher.unsafe_compute_mask_ptr(self._bits.data_ptr(), self._bits.numel() * 4)
            if self._matcher.is_error():
                raise RuntimeError(f"grammar: {_one_line(self._matcher.get_error())}")
            bits = np.unpackbits(self._bits.numpy().view(np.uint8), bitorder="little")[:self._vocab_size]
            self._blocked = bits == 0
        return self._blocked

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """A copy of `logits` ([..., vocab]) with every disallowed id at -inf, the ids past the
        tokenizer's vocabulary (rows the model has beyond it) included."""
        blocked = self._disallowed()
        vocab = logits.shape[-1]
        if vocab != blocked.size:
            blocked = np.concatenate([blocked, np.ones(max(0, vocab - blocked.size), bool)])[:vocab]
        if logits.device.type == "cpu" and logits.dtype == torch.float32:
            # numpy, on one thread: on a busy CPU torch's two-thread masked_fill of 262144 floats
            # was measured at 16-60 ms against numpy's 1 ms
            return torch.from_numpy(np.where(blocked, np.float32(-np.inf), logits.detach().numpy()))
        return logits.masked_fill(torch.from_numpy(blocked).to(logits.device), float("-inf"))

    def accept(self, token_id: int) -> None:
        """Advance past a sampled token; ValueError (and no change) if the grammar does not allow it."""
        token_id = int(token_id)
        if not 0 <= token_id < self._vocab_size or self._disallowed()[token_id]:
            raise ValueError(f"token {token_id} is not allowed by the grammar here")
        if not self._matcher.consume_token(token_id):  # the mask said yes: only a library fault gets here
            raise RuntimeError(f"grammar: {_one_line(self._matcher.get_error())}")
        self._blocked = None

    @property
    def done(self) -> bool:
        """The grammar takes nothing more but a stop token: the sequence must end now."""
        return self._matcher.is_stopped()


# ---- the vocabulary as llguidance sees it ----------------------------------------------------
_vocabularies: "weakref.WeakKeyDictionary[object, llguidance.LLTokenizer]" = weakref.WeakKeyDictionary()
_vocabularies_lock = threading.Lock()


def vocabulary_of(tokenizer) -> "llguidance.LLTokenizer":
    """llguidance's tokenizer for ours, built on first use (about a second for 262144 tokens) and
    kept as long as `tokenizer` lives."""
    with _vocabularies_lock:
        vocabulary = _vocabularies.get(tokenizer)
        if vocabulary is None:
            vocabulary = _vocabularies[tokenizer] = _build_vocabulary(tokenizer)
        return vocabulary


def token_bytes(tokenizer) -> list[bytes]:
    """The bytes each id stands for in decoded text. Byte tokens `<0xAB>` are that byte; SentencePiece
    pieces have U+2581 for a space; a byte-level BPE vocabulary spells bytes with GPT-2's alphabet.
    Special tokens get their own text here; llguidance is told they are special and never matches them."""
    special, byte_ids = tokenizer.special_token_ids, tokenizer.byte_token_ids
    probe = tokenizer.encode(" a", add_special_tokens=False)
    byte_level = _GPT2_SPACE in "".join(tokenizer.id_to_token(i) or "" for i in probe)
    from_gpt2 = {c: b for b, c in _gpt2_alphabet().items()}
    out = []
    for i in range(tokenizer.vocab_size):
        text = tokenizer.id_to_token(i) or ""
        if i in byte_ids:
            out.append(bytes([int(text[3:5], 16)]))
        elif i in special:
            out.append(text.encode("utf-8"))
        elif byte_level and all(c in from_gpt2 for c in text):
            out.append(bytes(from_gpt2[c] for c in text))
        else:
            out.append(text.replace(SPACE, " ").encode("utf-8"))
    return out


class _TokenizerView:
    """What llguidance.TokenizerWrapper reads: the token bytes, special ids, and an encoder (used
    only for prompts and diagnostics, never for masks)."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.tokens = token_bytes(tokenizer)
        self.eos_token_id = tokenizer.eos_token_id
        self.bos_token_id = tokenizer.bos_token_id
        self.special_token_ids = sorted(tokenizer.special_token_ids)

    def __call__(self, text) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode(text, add_special_tokens=False)


def _build_vocabulary(tokenizer) -> "llguidance.LLTokenizer":
    ends = sorted(tokenizer.stop_token_ids)
    if not ends:
        raise ValueError("response_format: the tokenizer has no end-of-sequence token to finish the JSON with")
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_TokenizerView(tokenizer)),
                                  n_vocab=tokenizer.vocab_size, eos_token=ends)


def _gpt2_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes stand for themselves, the
    others are shifted to U+0100 and up, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, shifted = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def _one_line(message: str) -> str:
    return " ".join(message.split())[:300] or "unknown error"
