"""Chat templates: sandboxed rendering, the built-in Gemma 3 / Gemma 4 turn formats, and the official
Gemma 4 template (fetched by tests/official.py) with what we do so that every client's messages work with
it. Expected prompt strings are written out by hand from the format facts in
shared/reference/gemma4-formats.md; transformers' apply_chat_template is the oracle for rendering."""

from datetime import datetime

import pytest

from gemma4.chat import GEMMA3_TEMPLATE, ChatTemplateError, ParsedOutput, ToolCall, parse_gemma4_output, render_chat
from gemma4.chat import tool_declaration
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


# ---- the official Gemma 4 template ---------------------------------------------------------------

def official(template, messages, **kw):
    return render_chat(messages, template=template, family="gemma4", bos_token="<bos>", eos_token="<eos>", **kw)


def call_to(name, call_id, **arguments):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


PARIS = call_to("get_weather", "call_1", unit="c", city="Paris")
TIME = call_to("get_time", "call_2", zone="CET")
# conversations the official template renders as the model expects: ours must give the same text
OFFICIAL_CONVERSATIONS = {
    "history": CONVERSATION,
    "developer first": [{"role": "developer", "content": " Be brief. "}, {"role": "user", "content": "Hi"}],
    "answered tool call": [
        {"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": "", "tool_calls": [PARIS]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
        {"role": "assistant", "content": "It is 21 C."}, {"role": "user", "content": "Thanks"}],
    "results awaited by the model": [
        {"role": "user", "content": "Weather and time?"},
        {"role": "assistant", "tool_calls": [PARIS, TIME], "reasoning_content": "Two lookups."},
        {"role": "tool", "tool_call_id": "call_2", "content": "noon"},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}],
    "pending call": [{"role": "user", "content": "Weather?"},
                     {"role": "assistant", "content": "", "reasoning_content": "Need it.", "tool_calls": [PARIS]}],
    "old thoughts": [{"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "<|channel>thought\nGreet.<channel|>Hello."},
                     {"role": "user", "content": [{"type": "text", "text": "Look "}, {"type": "image"},
                                                  {"type": "text", "text": " at this"}]}],
}


@pytest.mark.parametrize("enable_thinking", [False, True])
@pytest.mark.parametrize("name", OFFICIAL_CONVERSATIONS)
def test_gemma4_builtin_matches_official_template(official_template, hf_render, name, enable_thinking):
    messages = OFFICIAL_CONVERSATIONS[name]
    for kw in (dict(tools=[WEATHER_TOOL]), dict()):
        kw.update(enable_thinking=enable_thinking, add_generation_prompt=True)
        expected = hf_render(official_template, messages, **kw)
        assert official(official_template, messages, **kw) == expected
        assert gemma4(messages, **kw) == expected


PARTS = [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Use metric units. "}]
JOINED = "Be brief.\nUse metric units. "


@pytest.mark.parametrize("role", ["system", "developer", "user", "tool", "assistant"])
def test_text_parts_render_as_the_same_text_as_a_string(official_template, hf_render, role):
    def conversation(content):
        if role == "tool":
            return [{"role": "user", "content": "Weather?"}, {"role": "assistant", "tool_calls": [PARIS]},
                    {"role": "tool", "tool_call_id": "call_1", "content": content}]
        if role == "assistant":
            return [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": content},
                    {"role": "user", "content": "Go on"}]
        return [{"role": role, "content": content}, {"role": "user", "content": "Hi"}] if role != "user" else \
            [{"role": "user", "content": content}]

    expected = hf_render(official_template, conversation(JOINED), add_generation_prompt=True)
    assert official(official_template, conversation(PARTS)) == expected
    assert gemma4(conversation(PARTS)) == expected
    one_part = official(official_template, conversation(PARTS[:1]))
    assert one_part == official(official_template, conversation("Be brief."))
    if role in ("system", "developer"):  # what the template does with parts itself: their Python repr
        assert "[{'type': 'text'" in hf_render(official_template, conversation(PARTS), add_generation_prompt=True)


@pytest.mark.parametrize("enable_thinking", [False, True])
def test_results_after_content_and_calls_reopen_the_model_turn(official_template, hf_render, enable_thinking):
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "Let me check.", "tool_calls": [PARIS]},
                {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}]
    kw = dict(tools=[WEATHER_TOOL], enable_thinking=enable_thinking)
    closed = hf_render(official_template, messages, add_generation_prompt=True, **kw)
    assert closed.endswith("<tool_response|>Let me check.<turn|>\n")  # the template leaves no turn open
    opened = closed + "<|turn>model\n" + ("" if enable_thinking else "<|channel>thought\n<channel|>")
    assert official(official_template, messages, **kw) == opened
    assert gemma4(messages, **kw) == opened
    assert official(official_template, messages, add_generation_prompt=False, **kw) == closed


AGENT_TOOLS = [
    {"type": "function", "function": {"name": "edit", "description": "Edit a file", "parameters": {
        "type": "object", "required": ["path", "description"], "properties": {
            "path": {"type": "string"}, "description": {"type": "string", "description": "Why"},
            "type": {"type": "string", "enum": ["replace", "insert"]}}}}},
    {"type": "function", "function": {"name": "query", "description": "", "parameters": {
        "type": "object", "$defs": {"Filter": {"type": "object", "properties": {"field": {"type": "string"}}}},
        "properties": {"filter": {"$ref": "#/$defs/Filter"}, "limit": {"type": ["integer", "null"]},
                       "mode": {"enum": ["fast", "exact"]}, "key": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                       "rows": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}}}}},
    WEATHER_TOOL,
]


def test_agent_tool_schemas_reach_the_prompt_whole(official_template, hf_render):
    messages = [{"role": "user", "content": "Go"}]
    ours = official(official_template, messages, tools=AGENT_TOOLS)
    assert gemma4(messages, tools=AGENT_TOOLS) == ours
    theirs = hf_render(official_template, messages, tools=AGENT_TOOLS, add_generation_prompt=True)
    blocks = theirs.split("<|tool>")
    assert len(blocks) == len(AGENT_TOOLS) + 1
    # the template's text with each declaration swapped for ours: nothing else changes
    swapped = blocks[0] + "".join("<|tool>" + tool_declaration(tool) + "<tool|>" + block.split("<tool|>", 1)[1]
                                  for tool, block in zip(AGENT_TOOLS, blocks[1:]))
    assert ours == swapped
    for tool, block in zip(AGENT_TOOLS[:2], blocks[1:]):  # the template's own lose parts of the first two
        assert block.split("<tool|>")[0] != tool_declaration(tool)
