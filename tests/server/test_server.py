"""The OpenAI-compatible server, started for real on a loopback port and driven by the openai client."""

import json
import socket
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn

import gemma4
from gemma4 import store
from gemma4.checkpoint import open_checkpoint
from gemma4.checkpoint.gguf_writer import write_gguf
from gemma4.server import create_app
from reference import build_gemma4, gemma4_vocab_metadata


class LiveServer:
    def __init__(self, app):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key="none", **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kw)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def embedded():
    return gemma4.load(store.embedded_path())


@pytest.fixture(scope="module")
def server(embedded):
    live = LiveServer(create_app(embedded, model_name="gemma3-270m", max_batch=4, max_queue=8))
    yield live
    live.stop()


def greedy(model, prompt_ids, n):
    return model.generate(prompt_ids, max_tokens=n, temperature=0)


# ---- the embedded model: chat and completions ------------------------------------------------

def test_chat_non_stream_matches_the_engine(server, embedded):
    messages = [{"role": "user", "content": "Name a colour."}]
    r = server.client().chat.completions.create(model="gemma3-270m", messages=messages, max_tokens=12,
                                                temperature=0)
    ids = embedded.tokenizer.encode(embedded.chat_prompt(messages), add_special_tokens=False)
    expected = greedy(embedded, ids, 12)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(expected.token_ids)
    assert r.object == "chat.completion" and r.model == "gemma3-270m"


def test_chat_stream_with_usage(server, embedded):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Count to three."}]
    chunks = list(server.client().chat.completions.create(
        model="gemma3-270m", messages=messages, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    ids = embedded.tokenizer.encode(embedded.chat_prompt(messages), add_special_tokens=False)
    assert text == greedy(embedded, ids, 10).text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 10
    assert chunks[-1].usage.prompt_tokens == len(ids)


def test_completions_stream_and_not(server, embedded):
    client = server.client()
    prompt = "The capital of France is"
    expected = embedded.generate(prompt, max_tokens=8, temperature=0)
    r = client.completions.create(model="gemma3-270m", prompt=prompt, max_tokens=8, temperature=0)
    assert r.choices[0].text == expected.text and r.usage.completion_tokens == len(expected.token_ids)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="gemma3-270m", prompt=prompt, max_tokens=8, temperature=0, stream=True))
    assert streamed == expected.text
    ids = embedded.tokenizer.encode(prompt)
    r = client.completions.create(model="gemma3-270m", prompt=ids, max_tokens=8, temperature=0, echo=True)
    assert r.choices[0].text == embedded.tokenizer.decode(ids) + expected.text


def test_stop_seed_n_and_logprobs(server, embedded):
    client = server.client()
    prompt = "One, two, three, four,"
    full = embedded.generate(prompt, max_tokens=12, temperature=0).text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    r = client.completions.create(model="gemma3-270m", prompt=prompt, max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"

    a = client.completions.create(model="gemma3-270m", prompt=prompt, max_tokens=6, seed=3, n=2)
    b = client.completions.create(model="gemma3-270m", prompt=prompt, max_tokens=6, seed=3, n=2)
    assert [c.text for c in a.choices] == [c.text for c in b.choices] and len(a.choices) == 2
    assert a.usage.prompt_tokens == len(embedded.tokenizer.encode(prompt))  # counted once for n answers

    r = client.chat.completions.create(model="gemma3-270m", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 for t in content)
    assert content[0].top_logprobs[0].logprob >= content[0].top_logprobs[1].logprob
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob, abs=1e-5)  # greedy


def test_models_health_metrics(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["gemma3-270m"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    text = httpx.get(server.url + "/metrics").text
    for name in ("gemma4_requests_total", "gemma4_prompt_tokens_total", "gemma4_generation_tokens_total",
                 "gemma4_queue_depth", "gemma4_time_to_first_token_seconds_count", "gemma4_decode_tokens_per_second"):
        assert name in text
    generated = [line for line in text.splitlines() if line.startswith("gemma4_generation_tokens_total")]
    assert float(generated[0].split()[-1]) > 0


def test_concurrent_requests_each_get_their_own_answer(server, embedded):
    prompts = ["The sun is", "Water boils at", "My favourite food is", "In 1492,", "Cats and dogs", "Paris"]
    results = {}

    def ask(p):
        chunks = server.client().completions.create(model="gemma3-270m", prompt=p, max_tokens=10, temperature=0,
                                                    stream=True)
        results[p] = "".join(c.choices[0].text for c in chunks)

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for p in prompts:
        assert results[p] == embedded.generate(p, max_tokens=10, temperature=0).text


def test_a_client_that_disconnects_frees_its_row(server):
    sched = server.app.state.engine
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"prompt": "Once upon a time", "max_tokens": 5000, "stream": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 4:
                break
    deadline = time.time() + 30
    while sched.running or sched.queue_depth:
        assert time.time() < deadline, "the abandoned request kept running"
        time.sleep(0.05)


# ---- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("body,status,words", [
    ("{not json", 400, "not valid JSON"),
    ([1, 2], 400, "JSON object"),
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": []}, 400, "at least one message"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": -1}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10 ** 6}, 400, "context"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}]},
     400, "tool"),
    ({"messages": [{"role": "user", "content": "x"}], "model": "gpt-9"}, 404, "gpt-9"),
    ({"messages": [{"role": "user", "content": "x"}], "reasoning_effort": "high",
      "response_format": {"type": "json_object"}}, 400, "thinking"),
])
def test_bad_chat_requests_get_the_openai_error_object(server, body, status, words):
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(server.url + "/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"] and set(error) == {"message", "type", "param", "code"}


def test_a_prompt_longer_than_the_context_is_refused(server, embedded):
    context = embedded.config.max_position_embeddings
    r = httpx.post(server.url + "/v1/completions", json={"prompt": [5] * (context + 1), "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        server.client().completions.create(model="gemma3-270m", prompt="", max_tokens=1)
    # and the server still answers
    assert server.client().completions.create(model="gemma3-270m", prompt="Hi", max_tokens=1).choices


def test_api_key(embedded):
    live = LiveServer(create_app(embedded, model_name="m", api_key="sesame", max_batch=1))
    try:
        with pytest.raises(openai.AuthenticationError):
            live.client().models.list()
        with pytest.raises(openai.AuthenticationError):
            live.client(key="wrong").completions.create(model="m", prompt="x", max_tokens=1)
        assert live.client(key="sesame").models.list().data[0].id == "m"
        assert httpx.get(live.url + "/health").status_code == 200  # health needs no key
    finally:
        live.stop()


def _drain(lines) -> None:
    """Read a stream to its end; the test closing it under the reader ends the reading, quietly."""
    try:
        for _ in lines:
            pass
    except (httpx.ReadError, httpx.StreamClosed):
        pass


def test_a_full_queue_answers_503_with_retry_after(embedded):
    live = LiveServer(create_app(embedded, model_name="m", max_batch=1, max_queue=1))
    try:
        sched = live.app.state.engine
        body = {"prompt": "Once upon a time", "max_tokens": 3000, "stream": True}
        with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=60) as running:
            lines = running.iter_lines()
            next(lines)
            # a client reads its stream as it comes (one that does not is the next test's business)
            threading.Thread(target=_drain, args=(lines,), daemon=True).start()
            while sched.running < 1:
                time.sleep(0.01)
            with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=60) as waiting:
                while sched.queue_depth < 1:
                    time.sleep(0.01)
                r = httpx.post(live.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=60)
                assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["message"]
                assert waiting.status_code == 200
    finally:
        live.stop()


def test_a_client_that_stops_reading_does_not_hold_up_others(embedded):
    live = LiveServer(create_app(embedded, model_name="m", max_batch=2, max_queue=1))
    try:
        body = {"prompt": "Once upon a time", "max_tokens": 3000, "stream": True}
        with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=60) as stalled:
            next(stalled.iter_lines())  # then never reads again
            time.sleep(5)
            r = httpx.post(live.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=60)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        live.stop()


# ---- Gemma 4: thinking and tool calls, routed from a scripted model --------------------------

@pytest.fixture(scope="module")
def gemma4_tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("server-g4")
    build_gemma4(d / "hf", "moe_kv", seed=3)
    return gemma4.load(write_gguf(open_checkpoint(d / "hf"), d / "g4.gguf", "F32", gemma4_vocab_metadata()))


class Scripted:
    """Replaces the decoder's logits so that the model says `text` (then <turn|>), whatever the input."""

    def __init__(self, model, text):
        self.ids = model.tokenizer.encode(text, add_special_tokens=False) + [model.tokenizer.token_to_id("<turn|>")]
        self.step = 0
        self.real = model.decoder.logits

    def __call__(self, hidden):
        logits = self.real(hidden)
        forced = torch.full_like(logits, -1e4)
        forced[..., self.ids[min(self.step, len(self.ids) - 1)]] = 0.0
        self.step += 1
        return forced


@pytest.fixture()
def scripted(gemma4_tiny, monkeypatch):
    live = LiveServer(create_app(gemma4_tiny, model_name="g4", max_batch=1))

    def say(text):
        monkeypatch.setattr(gemma4_tiny.decoder, "logits", Scripted(gemma4_tiny, text))

    yield live, say
    live.stop()


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}


def test_reasoning_comes_back_apart_from_content(scripted):
    live, say = scripted
    say("<|channel>thought\nThe user greets.<channel|>Hello there")
    r = live.client().chat.completions.create(model="g4", messages=[{"role": "user", "content": "hi"}], max_tokens=40,
                                              extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    m = r.choices[0].message
    assert m.content == "Hello there" and m.model_extra["reasoning_content"] == "The user greets."
    say("<|channel>thought\nThe user greets.<channel|>Hello there")
    chunks = list(live.client().chat.completions.create(model="g4", messages=[{"role": "user", "content": "hi"}],
                                                        max_tokens=40, stream=True, reasoning_effort="high"))
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert reasoning == "The user greets." and content == "Hello there"


def test_tool_calls_round_trip(scripted, gemma4_tiny):
    live, say = scripted
    say('<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|><|tool_response>')
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    r = live.client().chat.completions.create(model="g4", messages=messages, tools=[WEATHER], max_tokens=60)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_") and call.type == "function"

    # the result goes back through the template, and the model's answer comes back as content
    say("It is sunny.")
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    prompt = gemma4_tiny.chat_prompt(messages, tools=[WEATHER])
    assert '<|tool_response>response:get_weather{value:<|"|>sunny, 21 C<|"|>}<tool_response|>' in prompt
    r = live.client().chat.completions.create(model="g4", messages=messages, tools=[WEATHER], max_tokens=60)
    assert r.choices[0].message.content == "It is sunny." and r.choices[0].finish_reason == "stop"

    # streamed: the call arrives as a tool_calls delta
    say('<|tool_call>call:get_weather{city:<|"|>Rome<|"|>}<tool_call|><|tool_response>')
    chunks = list(live.client().chat.completions.create(model="g4", messages=messages[:1], tools=[WEATHER],
                                                        max_tokens=60, stream=True))
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "get_weather" and calls[0].index == 0
    assert json.loads(calls[0].function.arguments) == {"city": "Rome"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_malformed_call_stays_content(scripted):
    live, say = scripted
    say("<|tool_call>call:get_weather{city:<tool_call|> oops")
    r = live.client().chat.completions.create(model="g4", messages=[{"role": "user", "content": "x"}],
                                              tools=[WEATHER], max_tokens=60)
    m = r.choices[0].message
    assert not m.tool_calls and "call:get_weather{city:" in m.content and r.choices[0].finish_reason == "stop"


def test_gemma4_serve_command(tmp_path, gemma4_tiny):
    import signal
    import subprocess
    import sys

    from gemma4.cli import build_parser

    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"  # loopback unless told otherwise
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = tmp_path
    build_gemma4(d / "hf", "dense_kv", seed=1)
    path = write_gguf(open_checkpoint(d / "hf"), d / "tiny.gguf", "F32", gemma4_vocab_metadata())
    proc = subprocess.Popen([sys.executable, "-m", "gemma4.cli", "serve", "-m", str(path), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        assert client.models.list().data[0].id == "tiny"
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert r.usage.completion_tokens >= 1
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode in (0, 130) and "Traceback" not in err, err
    assert f"serving 'tiny' on http://127.0.0.1:{port}/v1" in err


# ---- structured output ----------------------------------------------------------------------

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["name", "age"], "additionalProperties": False}


def test_json_schema_output_parses_and_validates(server):
    import jsonschema

    client = server.client()
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    for seed in range(3):
        r = client.chat.completions.create(model="gemma3-270m", messages=[{"role": "user", "content": "A person:"}],
                                           max_tokens=200, seed=seed, temperature=1.0, response_format=fmt)
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    chunks = client.completions.create(model="gemma3-270m", prompt="JSON:", max_tokens=200, temperature=0, stream=True,
                                       extra_body={"response_format": {"type": "json_object"}})
    assert isinstance(json.loads("".join(c.choices[0].text for c in chunks)), dict)


@pytest.mark.parametrize("fmt,words", [
    ({"type": "xml"}, "response_format"),
    ({"type": "json_schema"}, "json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wibble"}}}, "schema"),
])
def test_bad_response_formats_are_400(server, fmt, words):
    r = httpx.post(server.url + "/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "x"}], "response_format": fmt})
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
