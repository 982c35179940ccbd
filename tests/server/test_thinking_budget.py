"""Thinking budgets through the live server and the openai client: the budget fields (ours and the
spellings of vLLM and llama-server) and reasoning_effort bound the thought; the engine closes it and the
answer follows; max_tokens reached inside the thought is finish_reason "length" with the partial
reasoning_content."""

import httpx
import pytest

import gemma4
from gemma4.server import create_app
from gemma4.server.errors import APIError
from gemma4.server.prepare import BUDGET_FIELDS, EFFORT_BUDGETS, prepare_chat
from gemma4.server.schema import ChatCompletionRequest
from scripted import Thinker, running_output, thought_cut
from test_server import LiveServer

THOUGHT = "the cat is on the mat and the dog is in the den and the cat is in the den"
ANSWER = "the den"
USER = [{"role": "user", "content": "Where is the cat?"}]


@pytest.fixture(scope="module")
def model(chat_gguf):
    return gemma4.load(chat_gguf)


@pytest.fixture()
def live(model, monkeypatch):
    live = LiveServer(create_app(model, model_name="g4", max_batch=1))
    engine = live.app.state.engine
    monkeypatch.setattr(model.decoder, "logits", Thinker(model, THOUGHT, ANSWER, running_output(engine)))
    yield live
    live.stop()


def reasoning_of(message) -> str | None:
    return (message.model_extra or {}).get("reasoning_content")


@pytest.mark.parametrize("field", BUDGET_FIELDS)
def test_the_budget_closes_the_thought_and_the_answer_follows(live, model, field):
    r = live.client().chat.completions.create(model="g4", messages=USER, max_tokens=100, temperature=0,
                                              extra_body={field: 12})
    choice = r.choices[0]
    assert reasoning_of(choice.message) == thought_cut(model, THOUGHT, 12)
    assert choice.message.content == ANSWER and choice.finish_reason == "stop"
    answer_tokens = len(model.tokenizer.encode(ANSWER, add_special_tokens=False)) + 1  # and <turn|>
    assert r.usage.completion_tokens == 1 + 12 + len(model.thought_tokens[1]) + answer_tokens


def test_streamed_the_same(live, model):
    chunks = list(live.client().chat.completions.create(model="g4", messages=USER, max_tokens=100, temperature=0,
                                                        stream=True, extra_body={"thinking_budget": 12}))
    assert "".join(reasoning_of(c.choices[0].delta) or "" for c in chunks) == thought_cut(model, THOUGHT, 12)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ANSWER
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_unbounded_thinking_runs_to_its_end(live):
    r = live.client().chat.completions.create(model="g4", messages=USER, max_tokens=200, temperature=0,
                                              reasoning_effort="high", extra_body={"thinking_budget": -1})
    assert reasoning_of(r.choices[0].message) == THOUGHT + "\n" and r.choices[0].message.content == ANSWER


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_inside_the_thought_is_length_with_the_partial_reasoning(live, stream):
    kwargs = dict(model="g4", messages=USER, max_tokens=10, temperature=0, reasoning_effort="medium")
    if stream:
        chunks = list(live.client().chat.completions.create(stream=True, **kwargs))
        reasoning = "".join(reasoning_of(c.choices[0].delta) or "" for c in chunks)
        content = "".join(c.choices[0].delta.content or "" for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        choice = live.client().chat.completions.create(**kwargs).choices[0]
        reasoning, content, finish = reasoning_of(choice.message), choice.message.content, choice.finish_reason
    assert finish == "length" and not content
    assert reasoning and THOUGHT.startswith(reasoning)


# ---- what a request asks for, as prepare_chat reads it ---------------------------------------------
def prepared(model, **fields):
    job = prepare_chat(model, ChatCompletionRequest(messages=USER, **fields)).jobs[0]
    prompt = model.tokenizer.decode(job.prompt_ids)
    return "<|think|>" in prompt, job.params.thinking_budget


@pytest.mark.parametrize("effort", ["low", "medium", "high"])
def test_reasoning_effort_turns_thinking_on_with_its_budget(model, effort):
    assert prepared(model, reasoning_effort=effort) == (True, EFFORT_BUDGETS[effort])
    assert prepared(model, reasoning_effort=effort, thinking_budget=7) == (True, 7)  # a budget given wins


@pytest.mark.parametrize("fields,expected", [
    (dict(reasoning_effort="none"), (False, None)),
    (dict(reasoning_effort="minimal"), (False, None)),
    (dict(thinking_budget=0), (False, None)),  # as llama-server's budget 0: no thinking at all
    (dict(thinking_budget=0, reasoning_effort="high"), (False, None)),
    (dict(thinking_budget=-1), (False, None)),  # unbounded, and nothing turned thinking on
    (dict(thinking_budget=300), (True, 300)),  # a budget turns thinking on
    (dict(chat_template_kwargs={"enable_thinking": True}), (True, None)),  # as before: unbounded
    (dict(thinking_token_budget=5, thinking_budget_tokens=5), (True, 5)),
])
def test_what_turns_thinking_on_and_how_far(model, fields, expected):
    assert prepared(model, **fields) == expected


@pytest.mark.parametrize("body,words", [
    ({"thinking_budget": 5, "reasoning_budget_tokens": 6}, "disagree"),
    ({"thinking_budget": -2}, "thinking_budget"),
    ({"thinking_budget": "lots"}, "thinking_budget"),
    ({"thinking_budget": 5, "reasoning_effort": "none"}, "turned off"),
    ({"thinking_token_budget": 5, "chat_template_kwargs": {"enable_thinking": False}}, "turned off"),
])
def test_bad_budgets_are_400_naming_the_field(live, body, words):
    r = httpx.post(live.url + "/v1/chat/completions", json={"messages": USER, **body})
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text


def test_a_budget_for_a_model_without_a_thought_channel_is_a_400(model_with_tokenizer):
    with pytest.raises(APIError, match="no thought channel") as e:
        prepare_chat(model_with_tokenizer, ChatCompletionRequest(messages=USER, thinking_budget=8))
    assert e.value.status == 400
    # reasoning_effort alone stays what it was for such a model: no budget, no error
    job = prepare_chat(model_with_tokenizer, ChatCompletionRequest(messages=USER, reasoning_effort="low")).jobs[0]
    assert job.params.thinking_budget is None
