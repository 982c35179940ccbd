"""Thinking budgets: once a sequence has spent its budget inside a thought channel, the engine closes the
channel itself (a newline, then <channel|>, as the chat template writes the close) and generation goes on;
in a batch each sequence by its own budget, under speculative decoding without a draft crossing the close,
and after a prompt resumed from the prefix store."""

import pytest
import torch

import gemma4
from gemma4.engine import Engine, Request
from gemma4.kv import PrefixStore
from gemma4.sampling import SamplingParams, ThinkingBudget
from gemma4.speculative import PromptLookup
from scripted import Thinker, running_output, thought_cut


@pytest.fixture(scope="module")
def model(chat_gguf):
    return gemma4.load(chat_gguf)


@pytest.fixture()
def always_opens(model, monkeypatch):
    """The model's logits with <|channel> far ahead of every other token: left alone it thinks forever
    (each further <|channel> is one more thought token), so every close in its output is the engine's."""
    open_id = model.thought_tokens[0]
    real = model.decoder.logits

    def logits(hidden):
        out = real(hidden).clone()
        out[..., open_id] += 100.0  # the logits are soft-capped at 30: nothing else comes close
        return out

    monkeypatch.setattr(model.decoder, "logits", logits)
    return open_id


def expected(model, budget, n, inside=False):
    """The n tokens a model that always wants <|channel> produces under `budget`, worked out by hand:
    the open, `budget` thought tokens, the forced newline and close, again and again."""
    open_id, close_ids = model.thought_tokens
    out, spent, closing = [], 0, 0
    for _ in range(n):
        if inside and budget is not None and spent == budget:
            out.append(close_ids[closing])
            closing += 1
            if closing == len(close_ids):
                inside, closing = False, 0
        else:
            out.append(open_id)
            spent = spent + 1 if inside else 0
            inside = True
    return out


def run(engine, requests):
    outputs = {i: [] for i in range(len(requests))}
    finals = {}
    for i, out in engine.generate(requests):
        outputs[i].append(out.token_id)
        if out.finished:
            finals[i] = out
    return outputs, finals


def test_each_sequence_of_a_batch_closes_its_thought_at_its_own_budget(model, always_opens):
    budgets = [0, 2, 5, None]
    ids = model.tokenizer.encode("hello there", add_special_tokens=True)
    engine = Engine(model, max_batch=len(budgets))
    requests = [Request(ids, SamplingParams(max_tokens=16, temperature=0, thinking_budget=b)) for b in budgets]
    outputs, finals = run(engine, requests)
    for i, b in enumerate(budgets):
        assert outputs[i] == expected(model, b, 16), b
        assert finals[i].finish_reason == "length"
    assert model.thought_tokens[1][-1] not in outputs[3]  # unbounded: the model never closes it itself


def test_a_prompt_that_ends_inside_a_thought_is_counted_from_there(model, always_opens):
    open_id = model.thought_tokens[0]
    ids = model.tokenizer.encode("hi", add_special_tokens=True) + [open_id] + \
        model.tokenizer.encode("thought\n", add_special_tokens=False)
    outputs, _ = run(Engine(model, max_batch=1), [Request(ids, SamplingParams(max_tokens=10, temperature=0,
                                                                                 thinking_budget=3))])
    assert outputs[0] == expected(model, 3, 10, inside=True)


def test_drafts_never_cross_a_forced_close(model, always_opens, monkeypatch):
    """Prompt lookup drafts the repeating pattern, closes included, and the target (which always wants
    <|channel>) accepts drafts past the point where the budget runs out: the accepted run is cut there and
    the close takes its place. The tokens are those of plain decoding."""
    overrides = []
    real = ThinkingBudget.first_override

    def spy(self, tokens):
        found = real(self, tokens)
        overrides.append(found)
        return found

    monkeypatch.setattr(ThinkingBudget, "first_override", spy)
    ids = model.tokenizer.encode("hello there", add_special_tokens=True)
    engine = Engine(model, max_batch=2, speculative=4, drafter=PromptLookup())
    requests = [Request(ids, SamplingParams(max_tokens=40, temperature=0, thinking_budget=b)) for b in (2, 6)]
    outputs, finals = run(engine, requests)
    assert outputs[0] == expected(model, 2, 40) and outputs[1] == expected(model, 6, 40)
    assert all(f.drafted_tokens > 0 and f.accepted_tokens > 0 for f in finals.values())
    assert any(o is not None for o in overrides)  # the cut happened, not only drafts that stopped short


def test_a_prompt_resumed_from_the_prefix_store_keeps_its_budget(model, always_opens):
    ids = model.tokenizer.encode("the cat is on the mat and the dog is in the den " * 2, add_special_tokens=True)
    engine = Engine(model, max_batch=1, prefill_chunk=8, prefix_store=PrefixStore(1 << 26, block_tokens=4, min_tokens=1))
    for attempt in range(2):
        outputs, finals = run(engine, [Request(ids, SamplingParams(max_tokens=12, temperature=0,
                                                                    thinking_budget=3))])
        assert outputs[0] == expected(model, 3, 12)
    assert finals[0].cached_tokens > 0


# ---- through the Python API, with a model that thinks and then answers ---------------------------
THOUGHT = "the cat is on the mat and the dog is in the den"
ANSWER = "so the cat"


@pytest.fixture()
def thinker(model, monkeypatch):
    monkeypatch.setattr(model.decoder, "logits", Thinker(model, THOUGHT, ANSWER, running_output(model.engine)))
    return model


def test_chat_with_a_budget_thinks_that_long_then_answers(thinker, monkeypatch):
    seen = []
    real = thinker.chat_input
    monkeypatch.setattr(thinker, "chat_input", lambda *a, **kw: seen.append(kw["enable_thinking"]) or real(*a, **kw))
    reply = thinker.chat([{"role": "user", "content": "hi"}], thinking_budget=12, max_tokens=80, temperature=0)
    assert reply.reasoning == thought_cut(thinker, THOUGHT, 12) and len(reply.reasoning) < len(THOUGHT)
    assert reply.content == ANSWER and reply.finish_reason == "stop"
    assert seen == [True]  # a budget turns thinking on
    reply = thinker.chat([{"role": "user", "content": "hi"}], thinking_budget=10_000, max_tokens=200, temperature=0)
    assert reply.reasoning == THOUGHT + "\n" and reply.content == ANSWER  # a budget not reached changes nothing


def test_max_tokens_inside_the_thought_ends_with_length_and_the_partial_reasoning(thinker):
    reply = thinker.chat([{"role": "user", "content": "hi"}], enable_thinking=True, max_tokens=12, temperature=0)
    assert reply.finish_reason == "length" and reply.content == ""
    assert reply.reasoning and THOUGHT.startswith(reply.reasoning)
    events = list(thinker.chat([{"role": "user", "content": "hi"}], enable_thinking=True, max_tokens=12,
                               temperature=0, stream=True))
    assert "".join(e.text for e in events if e.kind == "reasoning") == reply.reasoning


def test_a_budget_needs_a_model_with_a_thought_channel(model_with_tokenizer):
    with pytest.raises(ValueError, match="thought channel"):
        model_with_tokenizer.generate("hello", max_tokens=2, thinking_budget=4)


@pytest.mark.parametrize("budget", [-1, 2.5, "8"])
def test_sampling_params_refuse_a_budget_that_is_not_a_count(budget):
    with pytest.raises(ValueError, match="thinking_budget"):
        SamplingParams(thinking_budget=budget)
