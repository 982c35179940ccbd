"""tool_choice through the live server and the openai client: "required" and a named function constrain
the answer to a call of a declared tool whose arguments validate against its schema (jsonschema checks
them), whatever the scripted model says; finish_reason is "tool_calls" only for a declared tool's call."""

import json

import httpx
import jsonschema
import openai
import pytest

from test_server import WEATHER, LiveServer, Scripted, gemma4_tiny, scripted  # noqa: F401 (fixtures)

LOOKUP = {"type": "function", "function": {"name": "lookup", "description": "Find a record", "parameters": {
    "type": "object",
    "properties": {"table": {"enum": ["users", "orders"]},
                   "id": {"type": "integer", "minimum": 1, "maximum": 999},
                   "fields": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 2},
                   "filter": {"type": "object", "properties": {"active": {"type": "boolean"},
                                                               "name": {"type": "string", "maxLength": 6}},
                              "required": ["active"]}},
    "required": ["table", "id"]}}}
FORECAST = {"type": "function", "function": {"name": "forecast", "parameters": {  # strings bounded: random ones end
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}, "days": {"type": "integer"}},
    "required": ["city"]}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, LOOKUP, FORECAST)}
USER = [{"role": "user", "content": "Find user 7."}]


def check(choice, names):
    """The choice is one or more calls, each to a tool in `names`, its arguments valid."""
    assert choice.finish_reason == "tool_calls", choice
    calls = choice.message.tool_calls
    assert calls and not choice.message.content
    for call in calls:
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return calls


def test_a_call_the_model_writes_itself_passes_the_grammar_unchanged(scripted):
    live, say = scripted
    say('<|tool_call>call:lookup{table:<|"|>users<|"|>,id:7}<tool_call|><|tool_response>')
    r = live.client().chat.completions.create(model="g4", messages=USER, tools=[WEATHER, LOOKUP], max_tokens=80,
                                              tool_choice={"type": "function", "function": {"name": "lookup"}})
    call = check(r.choices[0], {"lookup"})[0]
    assert json.loads(call.function.arguments) == {"table": "users", "id": 7}


@pytest.mark.parametrize("seed", range(3))
def test_a_named_choice_calls_that_tool_whatever_the_model_says(scripted, seed):
    """The scripted text is no call at all: every token it wants is masked, and the answer is drawn from
    what the grammar allows (all equally likely): still one valid call of the named tool."""
    live, say = scripted
    say("I would rather not call anything today, thank you.")
    r = live.client().chat.completions.create(model="g4", messages=USER, tools=[WEATHER, LOOKUP], max_tokens=300,
                                              seed=seed, tool_choice={"type": "function", "function": {"name": "lookup"}})
    assert len(check(r.choices[0], {"lookup"})) == 1


def test_required_calls_a_declared_tool_for_each_of_n_answers(scripted):
    live, say = scripted
    say("No.")
    r = live.client().chat.completions.create(model="g4", messages=USER, tools=[LOOKUP, FORECAST], max_tokens=300,
                                              tool_choice="required", n=2, seed=11)
    assert len(r.choices) == 2
    for choice in r.choices:
        check(choice, {"lookup", "forecast"})


def test_with_thinking_the_model_may_think_before_the_call(scripted):
    live, say = scripted
    say('<|channel>thought\nUser 7 it is.<channel|><|tool_call>call:lookup{table:<|"|>users<|"|>,id:7}<tool_call|>')
    chunks = list(live.client().chat.completions.create(
        model="g4", messages=USER, tools=[LOOKUP], max_tokens=80, tool_choice="required", reasoning_effort="low",
        stream=True))
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks)
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert reasoning == "User 7 it is."
    assert [c.function.name for c in calls] == ["lookup"] and json.loads(calls[0].function.arguments)["id"] == 7
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


CALL = '<|tool_call>call:get_weather{city:<|"|>Oslo<|"|>}<tool_call|><|tool_response>'


@pytest.mark.parametrize("extra", [{}, {"tools": [WEATHER], "tool_choice": "none"}, {"tools": [LOOKUP]}],
                         ids=["no tools", "tool_choice none", "another tool declared"])
def test_a_call_of_an_undeclared_tool_does_not_end_in_tool_calls(scripted, extra):
    live, say = scripted
    say(CALL)
    r = live.client().chat.completions.create(model="g4", messages=USER, max_tokens=60, **extra)
    assert r.choices[0].finish_reason == "stop"


def test_tools_the_grammar_cannot_express_are_a_400(scripted):
    live, _ = scripted
    bad = {"type": "function", "function": {"name": "get weather", "parameters": {"type": "object"}}}
    r = httpx.post(live.url + "/v1/chat/completions", json={"messages": USER, "tools": [bad],
                                                            "tool_choice": "required"})
    assert r.status_code == 400 and "cannot be written" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="no tool named"):
        live.client().chat.completions.create(model="g4", messages=USER, tools=[WEATHER],
                                              tool_choice={"type": "function", "function": {"name": "nope"}})


def test_model_chat_says_tool_calls_only_for_a_declared_tool(gemma4_tiny, monkeypatch):
    monkeypatch.setattr(gemma4_tiny.decoder, "logits", Scripted(gemma4_tiny, CALL))
    assert gemma4_tiny.chat(USER, tools=[WEATHER], max_tokens=60).finish_reason == "tool_calls"
    monkeypatch.setattr(gemma4_tiny.decoder, "logits", Scripted(gemma4_tiny, CALL))
    assert gemma4_tiny.chat(USER, tools=[LOOKUP], max_tokens=60).finish_reason == "stop"
