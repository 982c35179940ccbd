"""Anthropic's Messages API (/v1/messages), driven by the anthropic SDK unchanged against the live server; and
the three APIs giving the same greedy answer to the same conversation."""

import base64
import json

import anthropic
import httpx
import pytest

from gemma4.server import create_app
from test_server import LiveServer, embedded, gemma4_tiny, greedy, scripted, server  # noqa: F401

TOOL = {"name": "get_weather", "description": "Weather of a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CHAT_TOOL = {"type": "function", "function": {"name": TOOL["name"], "description": TOOL["description"],
                                              "parameters": TOOL["input_schema"]}}
CALL = '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|><|tool_response>'
THOUGHT = "<|channel>thought\nThe user greets.<channel|>"
GREEDY = {"temperature": 0}  # the SDK has no temperature argument; the API takes it


def client(live, key="none", **kw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=live.url, api_key=key, max_retries=0, **kw)


# ---- text, against the engine -------------------------------------------------------------------

def test_text_is_what_the_engine_says(server, embedded):
    m = client(server).messages.create(model="gemma3-270m", max_tokens=12, system="Be brief.", extra_body=GREEDY,
                                       messages=[{"role": "user", "content": "Name a colour."}])
    ids = embedded.chat_input([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}])
    expected = greedy(embedded, ids, 12)
    assert m.content[0].type == "text" and m.content[0].text == expected.text
    assert m.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[expected.finish_reason]
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == len(ids)
    assert m.usage.output_tokens == len(expected.token_ids) and m.role == "assistant" and m.id.startswith("msg_")


def test_stream_gives_the_same_message(server):
    api = client(server)
    kw = dict(model="gemma3-270m", max_tokens=10, extra_body=GREEDY,
              system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}],
              messages=[{"role": "user", "content": [{"type": "text", "text": "Hello"}]},
                        {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Count to three."}])
    plain = api.messages.create(**kw)
    with api.messages.stream(**kw) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == final.content[0].text == plain.content[0].text
    assert final.stop_reason == plain.stop_reason and final.usage.output_tokens == plain.usage.output_tokens


def test_stop_sequences(server, embedded):
    messages = [{"role": "user", "content": "Count from one to ten."}]
    full = client(server).messages.create(model="gemma3-270m", max_tokens=16, messages=messages,
                                          extra_body=GREEDY).content[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    m = client(server).messages.create(model="gemma3-270m", max_tokens=16, messages=messages, extra_body=GREEDY,
                                       stop_sequences=["never said", stop])
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == stop
    assert m.content[0].text == full[:full.index(stop)]


def test_count_tokens(server, embedded):
    messages = [{"role": "user", "content": "Name a colour."}]
    counted = client(server).messages.count_tokens(model="gemma3-270m", system="Be brief.", messages=messages)
    assert counted.input_tokens == len(embedded.chat_input([{"role": "system", "content": "Be brief."}, *messages]))
    blocks = [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}]
    counted = client(server).messages.count_tokens(model="gemma3-270m", system=blocks, messages=messages)
    assert counted.input_tokens == len(embedded.chat_input([{"role": "system", "content": blocks}, *messages]))


# ---- thinking, tools ------------------------------------------------------------------------------

def test_thinking_blocks_and_their_budget(scripted, gemma4_tiny):
    live, say = scripted
    api = client(live)
    say(THOUGHT + "Hello there")
    m = api.messages.create(model="g4", max_tokens=64, messages=[{"role": "user", "content": "hi"}],
                            thinking={"type": "enabled", "budget_tokens": 40})
    assert [b.type for b in m.content] == ["thinking", "text"]
    assert m.content[0].thinking == "The user greets." and m.content[1].text == "Hello there"
    # thinking reached the template (the prompt is the one with thinking on)
    prompt = gemma4_tiny.chat_input([{"role": "user", "content": "hi"}], enable_thinking=True)
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == len(prompt)

    say(THOUGHT + "Hello there")
    with api.messages.stream(model="g4", max_tokens=64, messages=[{"role": "user", "content": "hi"}],
                             thinking={"type": "enabled", "budget_tokens": 40}) as stream:
        thoughts = "".join(e.thinking for e in stream if e.type == "thinking")
        final = stream.get_final_message()
    assert thoughts == final.content[0].thinking == "The user greets." and final.content[1].text == "Hello there"

    # a budget shorter than the thought: the engine closes it there (the byte-level tiny vocabulary: a token a byte)
    say(THOUGHT + "Hello there")
    cut = api.messages.create(model="g4", max_tokens=64, messages=[{"role": "user", "content": "hi"}],
                              thinking={"type": "enabled", "budget_tokens": 12})
    assert cut.content[0].type == "thinking"
    cut_thought = cut.content[0].thinking.rstrip("\n")  # the engine's close starts a new line
    assert "The user greets.".startswith(cut_thought) and len(cut_thought) < len("The user greets.")

    with pytest.raises(anthropic.BadRequestError, match="budget_tokens"):
        api.messages.create(model="g4", max_tokens=40, messages=[{"role": "user", "content": "hi"}],
                            thinking={"type": "enabled", "budget_tokens": 40})


def test_tools_round_trip(scripted, gemma4_tiny):
    live, say = scripted
    api = client(live)
    say(CALL)
    question = {"role": "user", "content": "Weather in Paris?"}
    m = api.messages.create(model="g4", max_tokens=60, tools=[TOOL], messages=[question])
    (use,) = m.content
    assert m.stop_reason == "tool_use" and use.type == "tool_use" and use.name == "get_weather"
    assert use.input == {"city": "Paris"} and use.id.startswith("toolu_")

    # the result goes back with the call and the thoughts that led to it (a client keeps them)
    say("It is sunny.")
    thinking = {"type": "thinking", "thinking": "I should look it up.", "signature": ""}
    result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny, 21 C"}]}
    answer = api.messages.create(model="g4", max_tokens=60, tools=[TOOL], messages=[
        question, {"role": "assistant", "content": [thinking, use.model_dump(exclude_none=True)]}, result])
    assert answer.content[0].text == "It is sunny." and answer.stop_reason == "end_turn"
    chat = [question, {"role": "assistant", "content": None, "reasoning_content": "I should look it up.", "tool_calls": [
        {"id": use.id, "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": use.id, "content": "sunny, 21 C"}]
    prompt = gemma4_tiny.chat_prompt(chat, tools=[CHAT_TOOL])
    assert "<|channel>thought\nI should look it up." in prompt
    assert '<|tool_response>response:get_weather{value:<|"|>sunny, 21 C<|"|>}' in prompt
    assert answer.usage.input_tokens + answer.usage.cache_read_input_tokens == len(
        gemma4_tiny.chat_input(chat, tools=[CHAT_TOOL]))

    say(CALL)
    with api.messages.stream(model="g4", max_tokens=60, tools=[TOOL], messages=[question]) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert [e for e in events if e.type == "input_json"][-1].snapshot == {"city": "Paris"}
    assert final.content[0].input == {"city": "Paris"} and final.stop_reason == "tool_use"


def test_tool_choice_forces_a_call(scripted):
    live, say = scripted
    say('<|tool_call>call:get_weather{city:<|"|>Oslo<|"|>}<tool_call|><|tool_response>')  # what the grammar allows
    m = client(live).messages.create(model="g4", max_tokens=60, tools=[TOOL], messages=[{"role": "user", "content": "x"}],
                                     tool_choice={"type": "tool", "name": "get_weather"})
    assert m.content[0].input == {"city": "Oslo"} and m.stop_reason == "tool_use"


# ---- keys and bad requests ------------------------------------------------------------------------

def test_api_key_as_x_api_key_or_bearer(gemma4_tiny):
    live = LiveServer(create_app(gemma4_tiny, model_name="g4", api_key="sesame", max_batch=1))
    try:
        ask = dict(model="g4", max_tokens=1, messages=[{"role": "user", "content": "x"}])
        with pytest.raises(anthropic.AuthenticationError) as e:
            client(live, key="wrong").messages.create(**ask)
        assert e.value.body["error"]["type"] == "authentication_error"
        assert client(live, key="sesame").messages.create(**ask).usage.output_tokens == 1
        bearer = anthropic.Anthropic(base_url=live.url, auth_token="sesame", max_retries=0)
        assert bearer.messages.create(**ask).usage.output_tokens == 1
        assert live.client(key="sesame").models.list().data[0].id == "g4"  # the same key for the OpenAI routes
    finally:
        live.stop()


USER = [{"role": "user", "content": "x"}]


@pytest.mark.parametrize("body,status,kind,words", [
    ("{not json", 400, "invalid_request_error", "not valid JSON"),
    ({"messages": USER}, 400, "invalid_request_error", "max_tokens"),
    ({"max_tokens": 5, "messages": "hi"}, 400, "invalid_request_error", "messages"),
    ({"max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, 400, "invalid_request_error", "role"),
    ({"max_tokens": 5, "messages": USER, "temperature": 1.5}, 400, "invalid_request_error", "temperature"),
    ({"max_tokens": 5, "messages": USER, "stream": "maybe"}, 400, "invalid_request_error", "stream: Input"),
    ({"max_tokens": 10 ** 6, "messages": USER}, 400, "invalid_request_error", "max_tokens"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
     400, "invalid_request_error", "'document' blocks"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "file", "file_id": "f"}}]}]}, 400, "invalid_request_error", "source"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]}, 400, "invalid_request_error", "user messages"),
    ({"max_tokens": 5, "messages": USER, "tools": [{"type": "web_search_20250305", "name": "web_search"}]},
     400, "invalid_request_error", "server tool"),
    ({"max_tokens": 5, "messages": USER, "tools": [TOOL], "tool_choice": {"type": "sometimes"}},
     400, "invalid_request_error", "tool_choice"),
    ({"max_tokens": 5, "messages": USER, "thinking": {"type": "enabled"}}, 400, "invalid_request_error",
     "budget_tokens"),
    ({"max_tokens": 5, "messages": USER, "output_config": {"format": {"type": "xml"}}}, 400,
     "invalid_request_error", "output_config.format"),
    ({"max_tokens": 5, "messages": USER, "model": "claude-9"}, 404, "not_found_error", "claude-9"),
])
def test_bad_requests_get_the_anthropic_error_shape(server, body, status, kind, words):
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(server.url + "/v1/messages", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    payload = r.json()
    assert payload["type"] == "error" and payload["error"]["type"] == kind and words in payload["error"]["message"]
    assert set(payload) == {"type", "error"} and set(payload["error"]) == {"type", "message"}


def test_the_sdk_reads_our_errors(server):
    with pytest.raises(anthropic.BadRequestError, match="temperature"):
        client(server).messages.create(model="gemma3-270m", max_tokens=5, messages=USER, extra_body={"temperature": 3})
    with pytest.raises(anthropic.NotFoundError):
        client(server).messages.create(model="claude-9", max_tokens=5, messages=USER)


# ---- the three APIs agree -------------------------------------------------------------------------

def test_greedy_answers_are_the_same_through_all_three_apis(server, embedded):
    system, turns = "Answer in one line.", ["Hello", "Hi there.", "What is two plus two?"]
    chat = [{"role": "system", "content": system}] + [
        {"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]
    via_chat = server.client().chat.completions.create(model="gemma3-270m", messages=chat, max_tokens=16,
                                                       temperature=0).choices[0].message.content
    via_responses = server.client().responses.create(
        model="gemma3-270m", instructions=system, max_output_tokens=16, temperature=0,
        input=[{"role": m["role"], "content": m["content"]} for m in chat[1:]]).output_text
    via_messages = client(server).messages.create(model="gemma3-270m", system=system, max_tokens=16, extra_body=GREEDY,
                                                  messages=chat[1:]).content[0].text
    expected = greedy(embedded, embedded.chat_input(chat), 16).text
    assert via_chat == via_responses == via_messages == expected


def test_images_through_all_three_apis(tmp_path_factory):
    import gemma4
    from vision_reference import build_multimodal, encoded, picture

    path = tmp_path_factory.mktemp("mm-apis")
    build_multimodal(path, seed=3, name="dense_kv", bidirectional="vision")
    model = gemma4.load(path)
    live = LiveServer(create_app(model, model_name="mm", max_batch=2))
    try:
        data = base64.b64encode(encoded(picture(40, 30, 1), "PNG")).decode()
        url = "data:image/png;base64," + data
        chat = [{"role": "user", "content": [{"type": "text", "text": "Describe"},
                                             {"type": "image_url", "image_url": {"url": url}}]}]
        expected = model.generate(model.chat_input(chat), max_tokens=5, temperature=0)
        r = live.client().responses.create(model="mm", max_output_tokens=5, temperature=0, input=[
            {"role": "user", "content": [{"type": "input_text", "text": "Describe"},
                                         {"type": "input_image", "image_url": url}]}])
        m = client(live).messages.create(model="mm", max_tokens=5, extra_body=GREEDY, messages=[
            {"role": "user", "content": [{"type": "text", "text": "Describe"}, {"type": "image", "source": {
                "type": "base64", "media_type": "image/png", "data": data}}]}])
        assert r.usage.input_tokens == expected.prompt_tokens > 70  # the soft tokens are in the prompt
        assert r.output_text == m.content[0].text == expected.text
    finally:
        live.stop()
