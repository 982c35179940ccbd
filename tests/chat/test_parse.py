"""The Gemma 4 output parser on a table of model outputs, each parsed whole and streamed in pieces of
every size and cut everywhere (inside `<|"|>`, `<|tool_call>`, `<channel|>` …), and a property test: no
output makes it raise, the stream always equals the whole, every `arguments` is strict JSON, no channel
marker reaches content or reasoning, and text never vanishes. Expected results are written by hand
from the format facts in shared/reference/gemma4-formats.md."""

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gemma4.chat import (Gemma4StreamParser, ParsedOutput, ToolCall, format_tool_value, output_parser,
                         parse_gemma4_output, parse_output, parse_tool_value)
from gemma4.chat.parse import collect

Q = '<|"|>'
T = "<|channel>thought\n"
OUT = ParsedOutput


def call(name, **arguments):
    return ToolCall(name, arguments)


# text -> what it gives (content, reasoning, calls), any tool name accepted
CASES = {
    # ---- content and thoughts
    "content only": ("Paris is the capital of France.", OUT("Paris is the capital of France.", None, [])),
    "thought then content": (T + "The user wants 2+2.\n<channel|>It is 4.",
                             OUT("It is 4.", "The user wants 2+2.\n", [])),
    "empty thought": (T + "<channel|>Answer<turn|>", OUT("Answer", None, [])),
    "unfinished thought": (T + "Still going", OUT("", "Still going", [])),
    "doubled opener": (T + T + "x<channel|>y", OUT("y", "x", [])),
    "opener without its name, then with it": ("<|channel>" + T + "x<channel|>y", OUT("y", "x", [])),
    "doubled closer": (T + "x<channel|><channel|>y", OUT("y", "x", [])),
    "stray closer and turn ends": ("A<channel|>B<turn|>", OUT("AB", None, [])),
    "empty thought channel after the answer": ("Done." + T + "<channel|>", OUT("Done.", None, [])),
    "model turn opened again": ("<|turn>model\nHello", OUT("Hello", None, [])),
    "thought ends with the turn": (T + "hmm<turn|>", OUT("", "hmm", [])),
    "literal text that looks like markers": ("a < b, <|x|> and <channel ok; call me",
                                             OUT("a < b, <|x|> and <channel ok; call me", None, [])),
    "text mentioning call: is content": ("call: me maybe", OUT("call: me maybe", None, [])),
    # ---- calls as the template writes them
    "one call, nested arguments": (
        f"<|tool_call>call:get_weather{{city:{Q}Paris, FR{Q},days:3,opts:{{units:{Q}metric{Q},alerts:true,"
        f"hours:[6,12.5,-1e2]}},note:null}}<tool_call|><|tool_response>",
        OUT("", None, [call("get_weather", city="Paris, FR", days=3, note=None,
                            opts={"units": "metric", "alerts": True, "hours": [6, 12.5, -100.0]})])),
    "thought and several blocks": (
        f"{T}Two lookups.<channel|><|tool_call>call:get_weather{{city:{Q}Paris{Q}}}<tool_call|>"
        f"<|tool_call>call:get_time{{ zone : {Q}CET{Q}, formats:[{Q}iso{Q},{{short:false}}], {Q}raw key{Q}:[] }}"
        f"<tool_call|>",
        OUT("", "Two lookups.", [call("get_weather", city="Paris"),
                                 ToolCall("get_time", {"zone": "CET", "formats": ["iso", {"short": False}],
                                                       "raw key": []})])),
    "content around a call": ("Let me check.<|tool_call>call:lookup{}<tool_call|>",
                              OUT("Let me check.", None, [call("lookup")])),
    "several entries in one block": (
        f"<|tool_call>call:a{{x:1}}call:b{{y:{Q}2{Q}}}, call:c{{}};\ncall:d{{}}<tool_call|>",
        OUT("", None, [call("a", x=1), call("b", y="2"), call("c"), call("d")])),
    "call opened before the thought is closed": (
        f"{T}I need the weather.<|tool_call>call:get_weather{{city:{Q}Oslo{Q}}}<tool_call|><channel|>",
        OUT("", "I need the weather.", [call("get_weather", city="Oslo")])),
    "call right after <channel|> without its opener": (
        f"{T}Look it up.<channel|>call:get_weather{{city:{Q}Rome{Q}}}<tool_call|>",
        OUT("", "Look it up.", [call("get_weather", city="Rome")])),
    "call without its opener at the start of the answer": (
        f"call:get_weather{{city:{Q}Rome{Q}}}<tool_call|>", OUT("", None, [call("get_weather", city="Rome")])),
    "second call of a row without its opener": (
        "<|tool_call>call:a{}<tool_call|>\ncall:b{}<tool_call|>", OUT("", None, [call("a"), call("b")])),
    "closing markers inside a string": (
        f"<|tool_call>call:write{{text:{Q}a<tool_call|>b}}c<channel|>d<|channel>e<turn|>{Q}}}<tool_call|>",
        OUT("", None, [call("write", text="a<tool_call|>b}c<channel|>d<|channel>e<turn|>")])),
    "a block never closed, then the turn ends": ("<|tool_call>call:f{a:1}<|tool_response>",
                                                 OUT("", None, [call("f", a=1)])),
    "a block ended by the next one": ("<|tool_call>call:f{a:1}<|tool_call>call:g{}<tool_call|>",
                                      OUT("", None, [call("f", a=1), call("g")])),
    "a name alone in a block": ("<|tool_call>call:now<tool_call|>", OUT("", None, [call("now")])),
    # ---- drifts into JSON and Python
    "JSON quoting": ('<|tool_call>call:f{"city": "Paris", "xs": [ "a" ], "o": {"k": 1}, "e": "a\\"b\\u00e9"}'
                     '<tool_call|>', OUT("", None, [call("f", city="Paris", xs=["a"], o={"k": 1}, e='a"bé')])),
    "Python quoting": ("<|tool_call>call:f{'city': 'Paris', 'ok': True, 'none': None, 'it': 'it\\'s'}<tool_call|>",
                       OUT("", None, [call("f", city="Paris", ok=True, none=None, it="it's")])),
    "key=value": ('<|tool_call>call:f{city="Paris", n=2}<tool_call|>', OUT("", None, [call("f", city="Paris", n=2)])),
    "Python call with =": ('<|tool_call>f(city="Paris", n=2)<tool_call|>',
                           OUT("", None, [call("f", city="Paris", n=2)])),
    "Python call with :": ('<|tool_call>call:f(a: "v")<tool_call|>', OUT("", None, [call("f", a="v")])),
    "no call: prefix": ("<|tool_call>get_weather{}<tool_call|>", OUT("", None, [call("get_weather")])),
    "trailing comma": ("<|tool_call>call:f{a:1,}<tool_call|>", OUT("", None, [call("f", a=1)])),
    "a JSON call object": ('<|tool_call>{"name": "f", "arguments": {"a": 1}}<tool_call|>',
                           OUT("", None, [call("f", a=1)])),
    "a JSON call with arguments as a string": (
        '<|tool_call>{"name": "f", "arguments": "{\\"a\\": [1, 2]}"}<tool_call|>',
        OUT("", None, [call("f", a=[1, 2])])),
    "a JSON list of calls": ('<|tool_call>[{"name": "f", "arguments": {}}, {"name": "g", "parameters": {"b": 2}}]'
                             '<tool_call|>', OUT("", None, [call("f"), call("g", b=2)])),
    # ---- numbers JSON cannot carry keep their text
    "numbers beyond float range": ("<|tool_call>call:f{a:1e999,b:-2.5E+400,c:1e-999}<tool_call|>",
                                   OUT("", None, [call("f", a="1e999", b="-2.5E+400", c=0.0)])),
    "an integer with thousands of digits": ("<|tool_call>call:f{n:" + "7" * 5000 + "}<tool_call|>",
                                            OUT("", None, [call("f", n="7" * 5000)])),
    "big numbers in a JSON string of arguments": (
        '<|tool_call>{"name": "f", "arguments": "{\\"a\\": 1e999, \\"b\\": ' + "3" * 5000 + '}"}<tool_call|>',
        OUT("", None, [call("f", a="1e999", b="3" * 5000)])),
}

# a block that does not read as calls: kept as written, with what follows it
MALFORMED = [
    "<|tool_call>call:get_weather{city:Paris}<tool_call|>",          # a bare word is not a value
    "<|tool_call>call:get_weather{city:<|\"|>Paris}<tool_call|>",    # a string never closed
    "<|tool_call>call:f{a:1<tool_call|>",                            # an object never closed
    "<|tool_call>call:f{a:1} extra<tool_call|>",                     # text after the arguments
    "<|tool_call>call:f{a:[1 2]}<tool_call|>",                       # a missing comma
    "<|tool_call>call:f{a:truely}<tool_call|>",                      # not a literal
    "<|tool_call>call:f{a:1,a:2}<tool_call|>",                       # a key twice
    "<|tool_call>call:f(\"v\")<tool_call|>",                         # an argument without a name
    "<|tool_call>call:f{a:NaN,b:Infinity}<tool_call|>",              # not JSON numbers
    "<|tool_call>call:f{a:\"\\ud800\"}<tool_call|>",                 # a lone surrogate
    "<|tool_call>call:f{a:1}call:g{b:Paris}<tool_call|>",            # one bad entry spoils the block
    "<|tool_call>call:a b<tool_call|>",                              # two bare names
    '<|tool_call>{"name": "f", "arguments": [1]}<tool_call|>',       # arguments not an object
    '<|tool_call>{"name": "f", "arguments": "{\\"a\\": NaN}"}<tool_call|>',
    "<|tool_call>call:f{a:" + "[" * 100 + "]" * 100 + "}<tool_call|>",  # nested past any schema
    "<|tool_call>call:f{a:1",                                        # cut off
]


def streamed(text, sizes, tools=None):
    parser = Gemma4StreamParser(tools)
    events, i, k = [], 0, 0
    while i < len(text):
        n = sizes[k % len(sizes)]
        events += parser.feed(text[i:i + n])
        i, k = i + n, k + 1
    return collect(events + parser.finish())


def assert_same_streamed(text, whole, tools=None):
    """The whole result again from pieces: of fixed sizes (speculative decoding delivers several tokens
    at once), and cut in two at every position (inside every marker)."""
    for sizes in ([1], [2], [3], [5], [7], [16], [1, 4, 2, 9]):
        assert streamed(text, sizes, tools) == whole, sizes
    step = max(1, len(text) // 300)  # texts past 300 characters: every `step`-th cut, and all around markers
    cuts = set(range(0, len(text) + 1, step))
    for m in re.finditer(r"<[|a-z_\"]+[|>]*>?", text):
        cuts.update(range(m.start(), m.end() + 1))
    for cut in sorted(cuts):
        parser = Gemma4StreamParser(tools)
        assert collect(parser.feed(text[:cut]) + parser.feed(text[cut:]) + parser.finish()) == whole, cut


@pytest.mark.parametrize("name", CASES)
def test_parse_whole_and_streamed(name):
    text, expected = CASES[name]
    assert parse_gemma4_output(text) == expected
    assert_same_streamed(text, expected)


@pytest.mark.parametrize("text", MALFORMED)
def test_what_does_not_read_as_calls_stays_content(text):
    expected = OUT("Before. " + text + " After.", None, [])
    assert parse_gemma4_output("Before. " + text + " After.") == expected
    assert_same_streamed("Before. " + text + " After.", expected)
    good = "<|tool_call>call:ok{}<tool_call|>"
    assert parse_gemma4_output(good + text) == OUT(text, None, [call("ok")])


def test_a_string_never_closed_ends_at_the_first_marker():
    # the block cannot end inside its string, so it ends where the first closer stands; the rest is read on
    text = f"<|tool_call>call:f{{a:{Q}x}}<tool_call|>Then <|tool_call>call:g{{}}<tool_call|>"
    expected = OUT(f"<|tool_call>call:f{{a:{Q}x}}<tool_call|>Then ", None, [call("g")])
    assert parse_gemma4_output(text) == expected
    assert_same_streamed(text, expected)


def test_channel_markers_inside_a_kept_block_are_dropped():
    text = f"<|tool_call>call:f{{a:{Q}x<channel|>y{Q} junk}}<tool_call|>"
    assert parse_gemma4_output(text).content == f"<|tool_call>call:f{{a:{Q}xy{Q} junk}}<tool_call|>"


# ---- only declared tools become calls --------------------------------------------------------

DECLARED = [
    # (text, declared names, expected)
    ("<|tool_call>call:f{a:1}<tool_call|>", None, OUT("", None, [call("f", a=1)])),
    ("<|tool_call>call:f{a:1}<tool_call|>", {"f"}, OUT("", None, [call("f", a=1)])),
    ("<|tool_call>call:f{a:1}<tool_call|>", set(), OUT("<|tool_call>call:f{a:1}<tool_call|>", None, [])),
    ("<|tool_call>call:f{a:1}<tool_call|>", {"g"}, OUT("<|tool_call>call:f{a:1}<tool_call|>", None, [])),
    ("<|tool_call>call:f{a:1}call:g{}<tool_call|>", {"g"}, OUT("call:f{a:1}", None, [call("g")])),
    (T + "x<channel|>call:f{}<tool_call|>", set(), OUT("call:f{}<tool_call|>", "x", [])),
    ("call:note{text:<|\"|>hi<|\"|>} is how you write it", {"note"},
     OUT("call:note{text:<|\"|>hi<|\"|>} is how you write it", None, [])),
]


@pytest.mark.parametrize("text, tools, expected", DECLARED)
def test_only_declared_tools_become_calls(text, tools, expected):
    assert parse_gemma4_output(text, tools=tools) == expected
    assert parse_output(text, "gemma4", tools=tools) == expected
    assert_same_streamed(text, expected, tools)


def test_other_families_are_all_content():
    text = "<|tool_call>call:f{}<tool_call|><start_of_turn>"
    parser = output_parser("gemma3", tools={"f"})
    assert collect(parser.feed(text) + parser.finish()) == OUT(text, None, [])
    assert parse_output(text, "gemma3") == OUT(text, None, [])


def test_stream_holds_back_only_what_may_be_a_marker():
    parser = Gemma4StreamParser()
    assert [(e.kind, e.text) for e in parser.feed("Hmm <|chan")] == [("content", "Hmm ")]
    assert [(e.kind, e.text) for e in parser.feed("nel>thou")] == []
    assert [(e.kind, e.text) for e in parser.feed("ght\nsure<chan")] == [("reasoning", "sure")]
    assert [(e.kind, e.text) for e in parser.feed("nel|>ca")] == []  # may be a call without its opener
    assert [(e.kind, e.text) for e in parser.feed("n do. <")] == [("content", "can do. ")]
    assert parser.feed(f"|tool_call>call:f{{a:{Q}x<tool_call|>{Q}") == []
    events = parser.feed("}<tool_call|>")
    assert [(e.kind, e.tool_call) for e in events] == [("tool_call", call("f", a="x<tool_call|>"))]
    assert parser.finish() == []


def test_a_long_call_streams_in_linear_time():
    # a token at a time through a 200 000-character argument: each piece is read once, not the whole block again
    import time

    text = f"<|tool_call>call:write{{text:{Q}" + "word " * 40_000 + f"{Q}}}<tool_call|>"
    start = time.perf_counter()
    result = streamed(text, [4])
    assert result.tool_calls[0].arguments["text"] == "word " * 40_000
    assert time.perf_counter() - start < 5  # about 0.2 s here; the quadratic re-scan took minutes


# ---- the value notation ------------------------------------------------------------------------

NESTED = {"city": "Paris, FR", "days": 3, "opts": {"units": "metric", "alerts": True, "hours": [6, 12.5, -100.0]},
          "note": None, "tags": [], "empty": {}, "quote": 'say "hi" {x}: [y]'}


def test_tool_value_round_trip():
    text = format_tool_value(NESTED)
    assert text.startswith(f"{{city:{Q}Paris, FR{Q},days:3,opts:{{units:{Q}metric{Q},alerts:true,")
    assert parse_tool_value(text) == NESTED
    assert format_tool_value({"b": 1, "A": 2, "a": {"z": 0, "y": 1}}, sort_keys=True) == "{A:2,a:{y:1,z:0},b:1}"
    with pytest.raises(ValueError):
        parse_tool_value("{city:Paris}")


# ---- the property test -----------------------------------------------------------------------

PIECES = ["<|channel>", "<channel|>", "thought\n", "<|tool_call>", "<tool_call|>", Q, "<turn|>", "<|turn>",
          "model\n", "<|tool_response>", "call:", "f", "get_weather", "{", "}", "(", ")", "[", "]", ":", "=", ",",
          ";", '"', "'", "\\", "\\u00e9", "\\ud800", "1", "-2.5", "1e999", "9" * 4400, "true", "None", "NaN",
          " ", "\n", "x", "é", "<", "|", ">", "{\"name\": \"f\", \"arguments\": {}}"]
TEXTS = st.lists(st.sampled_from(PIECES), max_size=40).map("".join)
_CHANNEL = re.compile(r"<\|channel>|<channel\|>")
_MARKER = re.compile(r"<\|channel>|<channel\|>|<\|tool_call>|<tool_call\|>|<turn\|>|<\|turn>|<\|tool_response>")


def _strict(constant):
    raise AssertionError(f"not strict JSON: {constant}")


@settings(max_examples=400, deadline=None)
@given(TEXTS, st.lists(st.integers(1, 12), min_size=1, max_size=5), st.sampled_from([None, set(), {"f"}]))
def test_no_output_breaks_the_parser(text, sizes, tools):
    whole = parse_gemma4_output(text, tools=tools)  # raises nothing
    assert streamed(text, sizes, tools) == whole
    for c in whole.tool_calls:
        assert tools is None or c.name in tools
        assert json.loads(c.arguments_json, parse_constant=_strict) == c.arguments
        assert json.loads(json.dumps(c.arguments, allow_nan=False), parse_constant=_strict) == c.arguments
    assert not _CHANNEL.search(whole.content) and not _MARKER.search(whole.reasoning or "")
    if "<|channel>" not in text and "<|turn>" not in text and _MARKER.sub("", text).strip():
        assert whole.content or whole.tool_calls  # text never vanishes into an empty answer


KEYS = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)
STRINGS = (st.text(st.characters(blacklist_categories=["Cs"]), max_size=12).filter(lambda s: Q not in s)
           | st.sampled_from(["<tool_call|>", "}", "<channel|>", "<|channel>", "a,b:c", '"', "'", "\\"]))
VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                      | STRINGS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
                      max_leaves=12)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.dictionaries(KEYS, VALUES, max_size=4), min_size=1, max_size=3),
       st.lists(st.integers(1, 9), min_size=1, max_size=4))
def test_calls_the_template_writes_read_back(arguments, sizes):
    text = "".join(f"<|tool_call>call:f{format_tool_value(a)}<tool_call|>" for a in arguments) + "<|tool_response>"
    expected = OUT("", None, [ToolCall("f", a) for a in arguments])
    assert parse_gemma4_output(text) == expected
    assert streamed(text, sizes) == expected


@pytest.mark.parametrize("name", ["thought and several blocks", "closing markers inside a string",
                                  "call right after <channel|> without its opener", "JSON quoting"])
def test_streamed_token_by_token_through_the_real_tokenizer(gemma4_tokenizer, name):
    # the pieces a server gets: each token's text as the real vocabulary decodes it, markers as single tokens
    text, expected = CASES[name]
    ids = gemma4_tokenizer.encode(text, add_special_tokens=False)
    assert gemma4_tokenizer.decode(ids) == text
    decoder, parser, events = gemma4_tokenizer.stream(), Gemma4StreamParser(), []
    for token_id in ids:
        events += parser.feed(decoder.push(token_id))
    events += parser.feed(decoder.flush()) + parser.finish()
    assert collect(events) == expected
