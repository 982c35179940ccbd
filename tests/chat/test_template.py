"""Chat templates (sandboxed rendering, the built-in Gemma 3 / Gemma 4 turn formats) and the Gemma 4
output parser. Expected prompt strings are written out by hand from the format facts in
shared/reference/gemma4-formats.md; transformers' apply_chat_template is the oracle for rendering."""

import os
from datetime import datetime
from pathlib import Path

import pytest

from gemma4.chat import (GEMMA3_TEMPLATE, ChatTemplateError, Gemma4StreamParser, ParsedOutput, ToolCall,
                         format_tool_value, parse_gemma4_output, parse_tool_value, render_chat)
from paths import DATA

TEMPLATES = DATA / "templates"
Q = '<|"|>'

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there "},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]},
]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {
            "type": "object",
            "properties": {
                "unit": {"type": "string", "enum": ["c", "f"]},
                "city": {"type": "string", "description": "City name"},
            },
            "required": ["city"],
        },
    },
}
WEATHER_DECLARATION = (
    f"<|tool>declaration:get_weather{{description:{Q}Current weather{Q},parameters:{{properties:{{"
    f"city:{{description:{Q}City name{Q},type:{Q}STRING{Q}}},unit:{{enum:[{Q}c{Q},{Q}f{Q}],type:{Q}STRING{Q}}}}},"
    f"required:[{Q}city{Q}],type:{Q}OBJECT{Q}}}}}<tool|>"
)


def gemma4(messages, **kw):
    return render_chat(messages, template=None, family="gemma4", bos_token="<bos>", **kw)


# ---- the sandbox -----------------------------------------------------------------------------

ESCAPES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ joiner.__init__.__globals__.os }}",
    "{{ lipsum.__globals__['os'].popen('id').read() }}",
    "{{ ().__class__.__base__.__subclasses__() }}",
    "{{ ''['__class__'] }}",
    "{{ self._TemplateReference__context }}",
    "{{ namespace.__init__ }}",
    "{{ messages.append({'role': 'user'}) }}",
]


@pytest.mark.parametrize("template", ESCAPES)
def test_sandbox_refuses_python_internals(template):
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ChatTemplateError) as caught:
        render_chat(messages, template="before " + template + " after", family="gemma4", bos_token="<bos>")
    assert isinstance(caught.value, ValueError)
    message = str(caught.value)
    assert message.startswith("chat template: ") and "\n" not in message
    assert messages == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("template, words", [
    ("{% for m in messages %}{{ m.content }}", "syntax error on line 1"),
    ("line one\n{{ messages[0].content ) }}", "syntax error on line 2"),
    ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
    ("{{ 'a' + 1 }}", "TypeError"),
])
def test_template_errors_are_one_line(template, words):
    with pytest.raises(ChatTemplateError) as caught:
        render_chat([{"role": "user", "content": "hi"}], template=template, family="gemma4", bos_token="<bos>")
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_template_helpers():
    template = "{{ tools | tojson }}|{{ strftime_now('%Y') }}|{{ bos_token }}{{ eos_token }}|{{ flavour }}"
    out = render_chat([], template=template, family="gemma4", bos_token="<s>", eos_token="</s>",
                      tools=[{"name": "café <b>&"}], flavour="extra kwarg")
    assert out == f'[{{"name": "café <b>&"}}]|{datetime.now().year}|<s></s>|extra kwarg'


# ---- transformers as the oracle --------------------------------------------------------------

HF_STYLE = """\
{%- set ns = namespace(system='') -%}
{%- if messages[0]['role'] == 'system' %}{% set ns.system = messages[0]['content'] %}{% endif -%}
{%- if tools %}<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
{% endif -%}
{% for message in messages %}
{% if message['role'] == 'system' %}{% continue %}{% endif %}
<|im_start|>{{ message['role'] }}
{% if message['content'] is string %}{{ message['content'] }}{% else %}{{ message['content'] | map(attribute='text') | join }}{% endif %}
{% for call in message.get('tool_calls', []) %}<call>{{ call['function'] | tojson }}</call>{% endfor %}
<|im_end|>
{% endfor %}
{% if add_generation_prompt %}<|im_start|>assistant{% if enable_thinking %} think{% endif %}

{% endif %}
{{- ns.system | upper -}}
"""


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models

    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                                unk_token="<unk>")


def assert_same_as_transformers(tokenizer, template, messages, **kw):
    tokenizer.chat_template = template
    expected = tokenizer.apply_chat_template(messages, tokenize=False, **kw)
    ours = render_chat(messages, template=template, family="gemma4", bos_token="<bos>", eos_token="<eos>", **kw)
    assert ours == expected
    return ours


TOOL_CONVERSATION = [
    {"role": "system", "content": "Use tools. Ünïcode <ok> & fine."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    {"role": "assistant", "content": "Sunny."},
    {"role": "user", "content": "Thanks"},
]


@pytest.mark.parametrize("enable_thinking", [False, True])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_hf_style_template_matches_transformers(hf_tokenizer, enable_thinking, add_generation_prompt):
    out = assert_same_as_transformers(hf_tokenizer, HF_STYLE, TOOL_CONVERSATION, tools=[WEATHER_TOOL],
                                      enable_thinking=enable_thinking, add_generation_prompt=add_generation_prompt)
    assert '"description": "Current weather"' in out and out.endswith("USE TOOLS. ÜNÏCODE <OK> & FINE.")


@pytest.mark.parametrize("template", [(TEMPLATES / "gemma3_style.jinja").read_text(), GEMMA3_TEMPLATE],
                         ids=["fixture", "builtin"])
def test_gemma3_templates_match_transformers(hf_tokenizer, template):
    for add_generation_prompt in (False, True):
        assert_same_as_transformers(hf_tokenizer, template, CONVERSATION, add_generation_prompt=add_generation_prompt)


# ---- Gemma 3 turn format ---------------------------------------------------------------------

GEMMA3_EXPECTED = (
    "<bos><start_of_turn>user\nYou are terse.\n\nHi there<end_of_turn>\n"
    "<start_of_turn>model\nHello.<end_of_turn>\n"
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n"
    "<start_of_turn>model\n"
)


def test_gemma3_style_template():
    template = (TEMPLATES / "gemma3_style.jinja").read_text()
    assert render_chat(CONVERSATION, template=template, family="gemma3", bos_token="<bos>") == GEMMA3_EXPECTED
    with pytest.raises(ChatTemplateError, match="roles must go user, assistant"):
        render_chat(CONVERSATION[1:2] * 2, template=template, family="gemma3", bos_token="<bos>")


def test_gemma3_builtin():
    out = render_chat(CONVERSATION, template=None, family="gemma3", bos_token="<bos>")
    assert out == GEMMA3_EXPECTED
    no_prompt = render_chat(CONVERSATION, template=None, family="gemma3", bos_token="<bos>",
                            add_generation_prompt=False)
    assert no_prompt == GEMMA3_EXPECTED.removesuffix("<start_of_turn>model\n")


def test_unknown_family():
    with pytest.raises(ValueError, match="no built-in turn format"):
        render_chat(CONVERSATION, template=None, family="llama", bos_token="<s>")


# ---- Gemma 4 turn format ---------------------------------------------------------------------

def test_gemma4_thinking_off_prefills_empty_thought():
    assert gemma4([{"role": "user", "content": " Hi "}]) == (
        "<bos><|turn>user\nHi<turn|>\n<|turn>model\n<|channel>thought\n<channel|>")


def test_gemma4_thinking_on_opens_system_turn():
    assert gemma4([{"role": "user", "content": "Hi"}], enable_thinking=True) == (
        "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n")


def test_gemma4_system_and_history():
    assert gemma4(CONVERSATION) == (
        "<bos><|turn>system\nYou are terse.<turn|>\n"
        "<|turn>user\nHi there<turn|>\n"
        "<|turn>model\nHello.<turn|>\n"
        "<|turn>user\nWhat is 2+2?<turn|>\n"
        "<|turn>model\n<|channel>thought\n<channel|>")
    developer = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert gemma4(developer, enable_thinking=True, add_generation_prompt=False) == (
        "<bos><|turn>system\n<|think|>\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n")


def test_gemma4_old_thoughts_are_stripped():
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<|channel>thought\nGreet back.<channel|>Hello.", "reasoning_content": "x"},
        {"role": "user", "content": "Bye"},
    ]
    assert gemma4(messages, enable_thinking=True) == (
        "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\nHello.<turn|>\n"
        "<|turn>user\nBye<turn|>\n<|turn>model\n")


def test_gemma4_tool_declarations():
    assert gemma4([{"role": "user", "content": "Weather?"}], tools=[WEATHER_TOOL]) == (
        "<bos><|turn>system\n" + WEATHER_DECLARATION + "<turn|>\n"
        "<|turn>user\nWeather?<turn|>\n<|turn>model\n<|channel>thought\n<channel|>")
    with_system = gemma4([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Weather?"}],
                         tools=[WEATHER_TOOL], enable_thinking=True)
    assert with_system.startswith("<bos><|turn>system\n<|think|>\nBe kind." + WEATHER_DECLARATION + "<turn|>\n")


CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"unit": "c", "city": "Paris"}'}}
CALL_TEXT = f"<|tool_call>call:get_weather{{city:{Q}Paris{Q},unit:{Q}c{Q}}}<tool_call|>"
HEAD = "<bos><|turn>system\n" + WEATHER_DECLARATION + "<turn|>\n<|turn>user\nWeather in Paris?<turn|>\n"


def test_gemma4_tool_call_and_result():
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C, clear"},
    ]
    # after the results the model goes on in its own turn: no new turn, no generation prompt
    assert gemma4(messages, tools=[WEATHER_TOOL]) == (
        HEAD + "<|turn>model\n" + CALL_TEXT
        + f"<|tool_response>response:get_weather{{value:{Q}21 C, clear{Q}}}<tool_response|>")
    answered = messages + [{"role": "assistant", "content": "It is 21 C."}, {"role": "user", "content": "Thanks"}]
    assert gemma4(answered, tools=[WEATHER_TOOL]) == (
        HEAD + "<|turn>model\n" + CALL_TEXT
        + f"<|tool_response>response:get_weather{{value:{Q}21 C, clear{Q}}}<tool_response|>"
        + "It is 21 C.<turn|>\n<|turn>user\nThanks<turn|>\n<|turn>model\n<|channel>thought\n<channel|>")


def test_gemma4_pending_tool_call_awaits_response():
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "reasoning_content": "Need the tool.", "tool_calls": [CALL]}]
    assert gemma4(messages, tools=[WEATHER_TOOL], enable_thinking=True) == (
        HEAD.replace("<|turn>system\n", "<|turn>system\n<|think|>\n") + "<|turn>model\n"
        + "<|channel>thought\nNeed the tool.\n<channel|>" + CALL_TEXT + "<|tool_response>")


def test_gemma4_structured_tool_result_and_names():
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [
            {"id": "a", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "b", "function": {"name": "get_time", "arguments": {}}}]},
        {"role": "tool", "tool_call_id": "b", "content": "noon"},
        {"role": "tool", "tool_call_id": "a", "content": {"temp": 21, "ok": True, "tags": ["dry", None]}},
    ]
    out = gemma4(messages, tools=[WEATHER_TOOL])
    assert out.endswith(
        f"<|tool_call>call:get_weather{{city:{Q}Paris{Q}}}<tool_call|><|tool_call>call:get_time{{}}<tool_call|>"
        f"<|tool_response>response:get_time{{value:{Q}noon{Q}}}<tool_response|>"
        f"<|tool_response>response:get_weather{{ok:true,tags:[{Q}dry{Q},null],temp:21}}<tool_response|>")


def test_gemma4_template_call_reads_back():
    out = gemma4([{"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": "", "tool_calls": [CALL]}])
    generated = out[out.index("<|tool_call>"):]
    assert parse_gemma4_output(generated) == ParsedOutput("", None, [ToolCall("get_weather",
                                                                              {"city": "Paris", "unit": "c"})])


@pytest.mark.skipif(not os.environ.get("GEMMA4_OFFICIAL_TEMPLATE"),
                    reason="set GEMMA4_OFFICIAL_TEMPLATE to a Gemma 4 chat_template.jinja to compare with it")
@pytest.mark.parametrize("enable_thinking", [False, True])
def test_gemma4_builtin_matches_official_template(hf_tokenizer, enable_thinking):
    official = Path(os.environ["GEMMA4_OFFICIAL_TEMPLATE"]).read_text()
    conversations = [
        CONVERSATION,
        [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": {"unit": "c", "city": "Paris"}}}]},
         {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
         {"role": "assistant", "content": "It is 21 C."}, {"role": "user", "content": "Thanks"}],
    ]
    for messages in conversations:
        kw = dict(tools=[WEATHER_TOOL], enable_thinking=enable_thinking, add_generation_prompt=True)
        ours = assert_same_as_transformers(hf_tokenizer, official, messages, **kw)
        assert gemma4(messages, **kw) == ours


# ---- the value notation and the output parser -------------------------------------------------

NESTED = {"city": "Paris, FR", "days": 3, "opts": {"units": "metric", "alerts": True, "hours": [6, 12.5, -100.0]},
          "note": None, "tags": [], "empty": {}, "quote": 'say "hi" {x}: [y]'}


def test_tool_value_round_trip():
    text = format_tool_value(NESTED)
    assert text.startswith(f"{{city:{Q}Paris, FR{Q},days:3,opts:{{units:{Q}metric{Q},alerts:true,")
    assert parse_tool_value(text) == NESTED
    assert format_tool_value({"b": 1, "A": 2, "a": {"z": 0, "y": 1}}, sort_keys=True) == "{A:2,a:{y:1,z:0},b:1}"
    with pytest.raises(ValueError):
        parse_tool_value("{city:Paris}")


CASES = {
    "content only": ("Paris is the capital of France.",
                     ParsedOutput("Paris is the capital of France.", None, [])),
    "thought then content": ("<|channel>thought\nThe user wants 2+2.\n<channel|>It is 4.",
                             ParsedOutput("It is 4.", "The user wants 2+2.\n", [])),
    "empty thought": ("<|channel>thought\n<channel|>Answer<turn|>", ParsedOutput("Answer", None, [])),
    "unfinished thought": ("<|channel>thought\nStill going", ParsedOutput("", "Still going", [])),
    "one call, nested arguments": (
        f"<|tool_call>call:get_weather{{city:{Q}Paris, FR{Q},days:3,opts:{{units:{Q}metric{Q},alerts:true,"
        f"hours:[6,12.5,-1e2]}},note:null}}<tool_call|><|tool_response>",
        ParsedOutput("", None, [ToolCall("get_weather", {"city": "Paris, FR", "days": 3, "note": None, "opts": {
            "units": "metric", "alerts": True, "hours": [6, 12.5, -100.0]}})])),
    "thought and several calls": (
        f"<|channel>thought\nTwo lookups.<channel|><|tool_call>call:get_weather{{city:{Q}Paris{Q}}}<tool_call|>"
        f"<|tool_call>call:get_time{{ zone : {Q}CET{Q}, formats:[{Q}iso{Q},{{short:false}}], {Q}raw key{Q}:[] }}"
        f"<tool_call|>",
        ParsedOutput("", "Two lookups.", [
            ToolCall("get_weather", {"city": "Paris"}),
            ToolCall("get_time", {"zone": "CET", "formats": ["iso", {"short": False}], "raw key": []})])),
    "content around a call": (
        f"Let me check.<|tool_call>call:lookup{{}}<tool_call|>",
        ParsedOutput("Let me check.", None, [ToolCall("lookup", {})])),
    "stray markers dropped": ("A<channel|>B<turn|>", ParsedOutput("AB", None, [])),
    "literal text that looks like markers": ("a < b, <|x|> and <channel ok",
                                             ParsedOutput("a < b, <|x|> and <channel ok", None, [])),
}
MALFORMED = [
    "<|tool_call>call:get_weather{city:Paris}<tool_call|>",        # unquoted string
    "<|tool_call>call:get_weather{city:<|\"|>Paris}<tool_call|>",  # unterminated string
    "<|tool_call>call:f{a:1<tool_call|>",                          # unclosed object
    "<|tool_call>call:f{a:1,}<tool_call|>",                        # trailing comma
    "<|tool_call>call:f{a:1} extra<tool_call|>",                   # text after the arguments
    "<|tool_call>get_weather{}<tool_call|>",                       # no call: prefix
    "<|tool_call>call:f{a:[1 2]}<tool_call|>",                     # missing comma
    "<|tool_call>call:f{a:truely}<tool_call|>",                    # not a literal
    "<|tool_call>call:f{a:1}",                                     # never closed
]


@pytest.mark.parametrize("name", CASES)
def test_parse(name):
    text, expected = CASES[name]
    assert parse_gemma4_output(text) == expected


@pytest.mark.parametrize("text", MALFORMED)
def test_malformed_calls_stay_content(text):
    assert parse_gemma4_output("Before. " + text) == ParsedOutput("Before. " + text, None, [])
    good = "<|tool_call>call:ok{}<tool_call|>"
    assert parse_gemma4_output(good + text) == ParsedOutput(text, None, [ToolCall("ok", {})])


def test_too_deep_nesting_stays_content():
    text = "<|tool_call>call:f{a:" + "[" * 5000 + "<tool_call|>"
    assert parse_gemma4_output(text) == ParsedOutput(text, None, [])


def collect(events) -> ParsedOutput:
    reasoning = "".join(e.text for e in events if e.kind == "reasoning")
    return ParsedOutput("".join(e.text for e in events if e.kind == "content"), reasoning or None,
                        [e.tool_call for e in events if e.kind == "tool_call"])


STREAM_TEXTS = [text for text, _ in CASES.values()] + MALFORMED + [
    "<|channel>thought\nA<channel|>B<|tool_call>call:f{s:<|\"|><channel|> x<|\"|>}<tool_call|>C<|chan",
]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_cut_anywhere_equals_one_shot(text):
    whole = parse_gemma4_output(text)
    for cut in range(len(text) + 1):
        parser = Gemma4StreamParser()
        assert collect(parser.feed(text[:cut]) + parser.feed(text[cut:]) + parser.finish()) == whole, cut
    parser = Gemma4StreamParser()
    events = [e for ch in text for e in parser.feed(ch)] + parser.finish()
    assert collect(events) == whole


def test_stream_holds_back_partial_markers():
    parser = Gemma4StreamParser()
    assert [(e.kind, e.text) for e in parser.feed("Hmm <|chan")] == [("content", "Hmm ")]
    assert [(e.kind, e.text) for e in parser.feed("nel>thou")] == []
    assert [(e.kind, e.text) for e in parser.feed("ght\nsure<chan")] == [("reasoning", "sure")]
    assert [(e.kind, e.text) for e in parser.feed("nel|>4 <")] == [("content", "4 ")]
    events = parser.feed(f"|tool_call>call:f{{a:{Q}x{Q}")
    assert events == []
    events = parser.feed("}<tool_call|>")
    assert [(e.kind, e.tool_call) for e in events] == [("tool_call", ToolCall("f", {"a": "x"}))]
    assert parser.finish() == []
