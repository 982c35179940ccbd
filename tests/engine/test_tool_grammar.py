"""Forced tool calls: whatever the logits, the sampled answer is a call in Gemma 4's syntax that the chat
module's parser reads, to a declared tool, with arguments that validate against the tool's schema (checked
by jsonschema, not by the grammar library that did the masking)."""

import copy
import re

import jsonschema
import numpy as np
import pytest
import torch

from gemma4.chat import CALL_CLOSE, CALL_OPEN, CHANNEL_CLOSE, CHANNEL_OPEN, QUOTE, parse_output
from gemma4.tokenizer import Tokenizer
from gemma4.tool_grammar import tool_call_constraint
from reference import GEMMA4_SPECIAL_TOKENS, gemma4_vocab_metadata


def tool(name, parameters=None):
    function = {"name": name, "description": f"the {name} tool"}
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "minLength": 1, "maxLength": 12},
    "days": {"type": "integer", "minimum": 1, "maximum": 14},
    "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}
ORDER = {  # nested objects, arrays of objects, anyOf, booleans, a key that must be quoted
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0},
        "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object",
            "properties": {"sku": {"type": "string", "maxLength": 6}, "qty": {"type": "integer", "minimum": 1,
                                                                               "maximum": 9}},
            "required": ["sku", "qty"], "additionalProperties": False}},
        "ship to": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                     "express": {"type": "boolean"}}, "required": ["city"]},
        "note": {"anyOf": [{"type": "string", "maxLength": 10}, {"type": "null"}]},
        "a:b": {"type": "number", "exclusiveMinimum": 0, "maximum": 5},
        "tags": {"type": "array", "items": {"enum": ["a", "b", 7]}, "minItems": 2},
    },
    "required": ["id", "items", "note"],
    "additionalProperties": False,
}
TREE = {  # $defs, a recursive $ref, type lists and nullable
    "type": "object",
    "$defs": {"node": {"type": "object", "properties": {
        "label": {"type": ["string", "null"], "maxLength": 4},
        "weight": {"type": "number", "nullable": True, "minimum": -1, "maximum": 1},
        "children": {"type": "array", "maxItems": 1, "items": {"$ref": "#/$defs/node"}}},
        "required": ["label"]}},
    "properties": {"root": {"$ref": "#/$defs/node"}, "depth": {"const": 3}},
    "required": ["root", "depth"],
}
COUNTS = {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 99}}
TOOLS = [tool("get_weather", WEATHER), tool("place_order", ORDER), tool("grow", TREE), tool("count", COUNTS),
         tool("ping")]
SCHEMAS = {t["function"]["name"]: t["function"].get("parameters") for t in TOOLS}


def vocabulary(user_defined: bool) -> Tokenizer:
    """The tiny Gemma 4 vocabulary; user_defined: the call, quote and channel tokens are user-defined tokens
    (plain text to the tokenizer, matched whole), as in the real Gemma 4 vocabulary, not control tokens."""
    meta = copy.deepcopy(gemma4_vocab_metadata())
    if user_defined:
        plain = {CALL_OPEN, CALL_CLOSE, "<|tool_response>", "<tool_response|>", QUOTE, CHANNEL_OPEN, CHANNEL_CLOSE}
        tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
        for i, t in enumerate(tokens):
            if t in plain:
                types[i] = 4
        assert sum(t in plain for t in tokens) == len(plain) and set(plain) <= set(GEMMA4_SPECIAL_TOKENS)
    return Tokenizer.from_gguf_metadata(meta)


@pytest.fixture(scope="module", params=[False, True], ids=["control", "user-defined"])
def tok(request):
    return vocabulary(request.param)


def sample_call(constraint, tok, seed, extra_rows=16, max_steps=1500) -> list[int]:
    """mask -> pick -> accept until the grammar is done or a stop token is picked, from N(0, 1) logits
    (the argmax of i.i.d. logits is a uniform draw from the allowed ids). After 40 steps the tokens that
    close something get +6, so that values of unbounded size end; the mask still decides what is allowed."""
    rng = np.random.default_rng(seed)
    closing = [tok.token_to_id(t) for t in (QUOTE, CALL_CLOSE, CHANNEL_CLOSE, "<0x7D>", "<0x5D>")]
    ids = []
    for step in range(max_steps):
        if constraint.done:
            return ids
        logits = rng.standard_normal(tok.vocab_size + extra_rows, dtype=np.float32)
        if step >= 40:
            logits[closing] += 6
        token = int(constraint.mask_logits(torch.from_numpy(logits)).argmax())
        constraint.accept(token)
        if token in tok.stop_token_ids:
            return ids
        ids.append(token)
    raise AssertionError(f"not finished after {max_steps} tokens: {tok.decode(ids)!r}")


def check_calls(tok, ids, names):
    """The calls in the sampled ids: each to one of `names`, its arguments valid; nothing else but thoughts."""
    text = tok.decode(ids)
    parsed = parse_output(text, "gemma4")
    assert parsed.content.strip() == "" and parsed.tool_calls, text
    for call in parsed.tool_calls:
        assert call.name in names, text
        schema = SCHEMAS[call.name]
        if schema is None:
            assert call.arguments == {}
        else:
            jsonschema.validate(call.arguments, schema)
    # every quote, call and channel token is the one token, never its text spelled out in pieces
    for marker in (QUOTE, CALL_OPEN, CALL_CLOSE, CHANNEL_OPEN, CHANNEL_CLOSE):
        assert ids.count(tok.token_to_id(marker)) == text.count(marker), marker
    return parsed


@pytest.mark.parametrize("thinking", [False, True], ids=["plain", "thinking"])
@pytest.mark.parametrize("seed", range(4))
def test_required_gives_calls_to_declared_tools_with_valid_arguments(tok, seed, thinking):
    c = tool_call_constraint(TOOLS, None, tok, thinking=thinking)
    parsed = check_calls(tok, sample_call(c, tok, seed), set(SCHEMAS))
    assert thinking or parsed.reasoning is None


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("name", SCHEMAS)
def test_a_named_choice_calls_that_tool_once(tok, name, seed):
    c = tool_call_constraint(TOOLS, name, tok, thinking=seed % 2 == 1)
    ids = sample_call(c, tok, seed)
    assert c.done  # the grammar ends after the one call
    assert [call.name for call in check_calls(tok, ids, {name}).tool_calls] == [name]


def test_what_may_come_first(tok):
    call_open, channel_open = tok.token_to_id(CALL_OPEN), tok.token_to_id(CHANNEL_OPEN)
    first = torch.nonzero(tool_call_constraint(TOOLS, None, tok).allowed()).flatten().tolist()
    assert first == [call_open]
    first = torch.nonzero(tool_call_constraint(TOOLS, None, tok, thinking=True).allowed()).flatten().tolist()
    assert sorted(first) == sorted([call_open, channel_open])


def test_a_written_call_passes_only_if_its_arguments_fit(tok):
    def feed(name, text):
        c = tool_call_constraint(TOOLS, name, tok, thinking=True)
        for token in tok.encode(text, add_special_tokens=False):
            c.accept(token)
        return c

    good = (f'{CHANNEL_OPEN}thought\nParis, two days.{CHANNEL_CLOSE}'
            f'{CALL_OPEN}call:get_weather{{city:{QUOTE}Paris{QUOTE},days:2}}{CALL_CLOSE}')
    assert feed("get_weather", good).done
    for bad in ['call:get_weather{days:2}',  # the required city missing
                f'call:get_weather{{city:{QUOTE}Paris{QUOTE},days:20}}',  # above the maximum
                f'call:get_weather{{city:{QUOTE}Paris{QUOTE},unit:{QUOTE}kelvin{QUOTE}}}',  # not in the enum
                f'call:get_weather{{city:{QUOTE}Paris{QUOTE},wind:1}}',  # an undeclared key
                f'call:place_order{{id:1}}']:  # another tool than the one named
        with pytest.raises(ValueError, match="not allowed"):
            feed("get_weather", CALL_OPEN + bad + CALL_CLOSE)


@pytest.mark.parametrize("tools,name,words", [
    ([tool("get weather", WEATHER)], None, "name"),
    ([tool("f", {"type": "object", "properties": {"x": {"$ref": "#/nowhere"}}})], None, "$ref"),
    ([tool("f", {"type": "object", "properties": {f"a{QUOTE}b": {"type": "string"}}})], None, "property name"),
    (TOOLS, "nope", "no tool named"),
])
def test_tools_that_cannot_be_called_are_refused_in_one_line(tok, tools, name, words):
    with pytest.raises(ValueError, match=re.escape(words)) as e:
        tool_call_constraint(tools, name, tok)
    assert "\n" not in str(e.value)


def test_a_vocabulary_without_the_call_tokens_is_refused(tmp_path):
    from reference import write_byte_tokenizer

    write_byte_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="vocabulary has no"):
        tool_call_constraint(TOOLS, None, Tokenizer.from_file(tmp_path))
