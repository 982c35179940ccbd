"""OpenAI's Responses API (/v1/responses), driven by the openai SDK unchanged against the live server."""

import json

import httpx
import openai
import pytest

from gemma4.server import create_app
from test_server import PERSON, LiveServer, embedded, gemma4_tiny, greedy, scripted, server  # noqa: F401

FUNCTION = {"type": "function", "name": "get_weather", "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CHAT_TOOL = {"type": "function", "function": {k: FUNCTION[k] for k in ("name", "description", "parameters")}}
CALL = '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|><|tool_response>'
THOUGHT = "<|channel>thought\nThe user greets.<channel|>"


def _ids(model, messages, **kw):
    return model.chat_input(messages, **kw)


# ---- text, against the engine -------------------------------------------------------------------

def test_text_is_what_the_engine_says(server, embedded):
    r = server.client().responses.create(model="gemma3-270m", instructions="Be brief.", input="Name a colour.",
                                         max_output_tokens=12, temperature=0)
    ids = _ids(embedded, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}])
    expected = greedy(embedded, ids, 12)
    assert r.output_text == expected.text and r.object == "response" and r.model == "gemma3-270m"
    assert r.usage.input_tokens == len(ids) and r.usage.output_tokens == len(expected.token_ids)
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    if expected.finish_reason == "length":
        assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    else:
        assert r.status == "completed" and r.incomplete_details is None
    message = r.output[-1]
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")


def test_a_cut_answer_is_incomplete_streamed_or_not(server):
    client = server.client()
    r = client.responses.create(model="gemma3-270m", input="Tell me a long story.", max_output_tokens=3)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output[-1].status == "incomplete" and r.usage.output_tokens == 3
    events = list(client.responses.create(model="gemma3-270m", input="Tell me a long story.", max_output_tokens=3,
                                          stream=True))
    assert events[-1].type == "response.incomplete" and events[-1].response.status == "incomplete"
    assert events[-1].response.output[-1].content[0].text == "".join(
        e.delta for e in events if e.type == "response.output_text.delta")


def test_stream_events_and_the_final_response(scripted):
    live, say = scripted
    say("Hello there, friend.")
    with live.client().responses.stream(model="g4", input="hi", max_output_tokens=40) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-4].text == final.output_text == "Hello there, friend."
    assert final.status == "completed" and final.usage.output_tokens > 0 and final.output[0].status == "completed"

    say("Hello there, friend.")
    plain = live.client().responses.create(model="g4", input="hi", max_output_tokens=40)
    assert [o.type for o in plain.output] == [o.type for o in final.output]
    assert plain.output_text == final.output_text and plain.usage.input_tokens == final.usage.input_tokens


# ---- reasoning, tools, previous_response_id -------------------------------------------------------

def test_reasoning_with_its_summary(scripted, gemma4_tiny):
    live, say = scripted
    say(THOUGHT + "Hello there")
    r = live.client().responses.create(model="g4", input="hi", max_output_tokens=40,
                                       reasoning={"effort": "high", "summary": "auto"})
    thought, message = r.output
    assert thought.type == "reasoning" and thought.content[0].text == "The user greets."
    assert thought.summary[0].text == "The user greets." and r.output_text == "Hello there"
    tokenizer = gemma4_tiny.tokenizer
    assert r.usage.output_tokens_details.reasoning_tokens == len(tokenizer.encode(THOUGHT, add_special_tokens=False))
    # effort reached the template: the prompt is the one with thinking on
    assert r.usage.input_tokens == len(_ids(gemma4_tiny, [{"role": "user", "content": "hi"}], enable_thinking=True))

    say(THOUGHT + "Hello there")
    with live.client().responses.stream(model="g4", input="hi", max_output_tokens=40,
                                        reasoning={"effort": "low"}) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == "The user greets."
    assert not [e for e in events if e.type.startswith("response.reasoning_summary")]  # no summary asked for
    assert final.output[0].content[0].text == "The user greets." and final.output[0].summary == []
    assert final.output_text == "Hello there"


def test_tools_round_trip_and_previous_response_id(scripted, gemma4_tiny):
    live, say = scripted
    client = live.client()
    say(CALL)
    r = client.responses.create(model="g4", input="Weather in Paris?", tools=[FUNCTION], max_output_tokens=60)
    (call,) = r.output
    assert call.type == "function_call" and call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert call.call_id.startswith("call_") and r.status == "completed"

    # the whole conversation as input, and the same continued from the stored response: one prompt
    chat = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call.call_id, "type": "function", "function": {"name": "get_weather", "arguments": call.arguments}}]},
            {"role": "tool", "tool_call_id": call.call_id, "content": "sunny, 21 C"}]
    prompt = gemma4_tiny.chat_prompt(chat, tools=[CHAT_TOOL])
    assert '<|tool_response>response:get_weather{value:<|"|>sunny, 21 C<|"|>}<tool_response|>' in prompt
    expected = len(_ids(gemma4_tiny, chat, tools=[CHAT_TOOL]))
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}
    say("It is sunny.")
    whole = client.responses.create(model="g4", tools=[FUNCTION], max_output_tokens=60, input=[
        {"role": "user", "content": "Weather in Paris?"}, call.model_dump(exclude_none=True), result])
    say("It is sunny.")
    continued = client.responses.create(model="g4", tools=[FUNCTION], max_output_tokens=60, input=[result],
                                        previous_response_id=r.id)
    assert whole.usage.input_tokens == continued.usage.input_tokens == expected
    assert whole.output_text == continued.output_text == "It is sunny."
    assert continued.previous_response_id == r.id

    # streamed: the call comes as an item with its arguments
    say(CALL)
    with client.responses.stream(model="g4", input="Weather?", tools=[FUNCTION], max_output_tokens=60) as stream:
        events = list(stream)
        final = stream.get_final_response()
    (delta,) = [e for e in events if e.type == "response.function_call_arguments.delta"]
    assert json.loads(delta.delta) == {"city": "Paris"} and final.output[0].type == "function_call"
    assert final.output[0].call_id == [e for e in events if e.type == "response.output_item.done"][0].item.call_id


def test_tool_choice_forces_a_call(scripted):
    live, say = scripted
    say('<|tool_call>call:get_weather{city:<|"|>Oslo<|"|>}<tool_call|><|tool_response>')  # what the grammar allows
    r = live.client().responses.create(model="g4", input="x", tools=[FUNCTION], max_output_tokens=60,
                                       tool_choice={"type": "function", "name": "get_weather"})
    assert r.output[0].name == "get_weather" and json.loads(r.output[0].arguments) == {"city": "Oslo"}
    with pytest.raises(openai.BadRequestError, match="nope"):
        live.client().responses.create(model="g4", input="x", tools=[FUNCTION],
                                       tool_choice={"type": "function", "name": "nope"})


def test_previous_response_id_keeps_the_conversation_not_the_instructions(server, embedded):
    client = server.client()
    first = client.responses.create(model="gemma3-270m", instructions="Be brief.", input="Hello", max_output_tokens=6,
                                    temperature=0)
    second = client.responses.create(model="gemma3-270m", input="And then?", previous_response_id=first.id,
                                     max_output_tokens=6, temperature=0)
    ids = _ids(embedded, [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first.output_text},
                          {"role": "user", "content": "And then?"}])
    assert second.usage.input_tokens == len(ids) and second.output_text == greedy(embedded, ids, 6).text
    assert client.responses.retrieve(first.id).output_text == first.output_text

    unstored = client.responses.create(model="gemma3-270m", input="Hello", max_output_tokens=2, store=False)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="gemma3-270m", input="x", previous_response_id=unstored.id)
    assert e.value.code == "previous_response_not_found" and e.value.param == "previous_response_id"
    client.responses.delete(first.id)
    with pytest.raises(openai.BadRequestError, match="not stored"):
        client.responses.create(model="gemma3-270m", input="x", previous_response_id=first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)


def test_stored_responses_are_bounded(gemma4_tiny):
    live = LiveServer(create_app(gemma4_tiny, model_name="g4", max_batch=1, responses_kept=2))
    try:
        client = live.client()
        made = [client.responses.create(model="g4", input=f"turn {i}", max_output_tokens=1).id for i in range(3)]
        with pytest.raises(openai.BadRequestError, match="older than the 2"):
            client.responses.create(model="g4", input="x", previous_response_id=made[0], max_output_tokens=1)
        assert client.responses.create(model="g4", input="x", previous_response_id=made[2], max_output_tokens=1).id
    finally:
        live.stop()


def test_json_schema_text_format(server):
    import jsonschema
    from pydantic import BaseModel, Field

    client = server.client()
    fmt = {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}
    r = client.responses.create(model="gemma3-270m", input="A person:", text={"format": fmt}, max_output_tokens=200,
                                temperature=1.0)
    jsonschema.validate(json.loads(r.output_text), PERSON)

    class City(BaseModel):  # bounded, so that a sampled answer ends within the tokens given
        name: str = Field(max_length=12)
        rank: int = Field(ge=0, le=150)

    parsed = client.responses.parse(model="gemma3-270m", input="A city:", text_format=City, max_output_tokens=200)
    assert isinstance(parsed.output_parsed, City)


# ---- keys and bad requests ------------------------------------------------------------------------

def test_api_key_as_bearer_or_x_api_key(gemma4_tiny):
    live = LiveServer(create_app(gemma4_tiny, model_name="g4", api_key="sesame", max_batch=1))
    try:
        with pytest.raises(openai.AuthenticationError):
            live.client(key="wrong").responses.create(model="g4", input="x", max_output_tokens=1)
        assert live.client(key="sesame").responses.create(model="g4", input="x", max_output_tokens=1).usage
        r = httpx.post(live.url + "/v1/responses", json={"input": "x", "max_output_tokens": 1},
                       headers={"x-api-key": "sesame"})
        assert r.status_code == 200 and r.json()["object"] == "response"
    finally:
        live.stop()


@pytest.mark.parametrize("body,status,words", [
    ({"input": "x", "tools": [{"type": "web_search"}]}, 400, "'web_search' tools are not supported"),
    ({"input": "x", "tool_choice": {"type": "file_search"}}, 400, "tool_choice"),
    ({"input": [{"type": "computer_call_output", "call_id": "c", "output": {}}]}, 400, "input.0.type"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, 400, "input_file"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]}, 400, "file_id"),
    ({"input": [{"role": "wizard", "content": "x"}]}, 400, "input.0.role"),
    ({"input": "x", "text": {"format": {"type": "xml"}}}, 400, "text.format"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "x"}}}, 400, "text.format.schema"),
    ({"input": "x", "max_output_tokens": 0}, 400, "max_output_tokens"),
    ({"input": "x", "max_output_tokens": 10 ** 6}, 400, "max_output_tokens"),
    ({"input": "x", "reasoning": {"effort": "huge"}}, 400, "reasoning.effort"),
    ({"input": "x", "background": True}, 400, "background"),
    ({"input": "x", "previous_response_id": "resp_nope"}, 400, "resp_nope"),
    ({"input": ""}, 400, "input"),
    ({"input": "x", "model": "gpt-9"}, 404, "gpt-9"),
    ({"input": "x", "tool_choice": "required"}, 400, "tool_choice"),
    ({"input": "x", "tool_choice": 5}, 400, "tool_choice: Input should be"),
    ({"input": "x", "stream": "maybe"}, 400, "stream: Input should be"),
])
def test_bad_requests_get_the_openai_error_object(server, body, status, words):
    r = httpx.post(server.url + "/v1/responses", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"] and set(error) == {"message", "type", "param", "code"}, error
