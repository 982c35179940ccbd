"""The server with a KV budget and automatic prefix reuse: a second question on the same document
reuses its KV and answers as a plain run does; a request larger than the whole budget gets a 400."""

import httpx
import pytest

import gemma4
from gemma4 import store
from gemma4.server import create_app
from test_server import LiveServer


@pytest.fixture(scope="module")
def embedded():
    return gemma4.load(store.embedded_path())


def test_prefix_reuse_and_budget_through_the_server(embedded):
    live = LiveServer(create_app(embedded, model_name="m", max_batch=2, kv_budget=64 * 2**20,
                                 prefix_cache_bytes=2**30))
    try:
        sched = live.app.state.engine
        doc = " ".join(f"Item {i} is a small {['red', 'blue', 'green'][i % 3]} box." for i in range(60))
        answers = []
        for q in ("Which item is blue?", "How many boxes are green?"):
            prompt = doc + "\n" + q
            r = httpx.post(live.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 8,
                                                               "temperature": 0}, timeout=120)
            assert r.status_code == 200, r.text
            answers.append((prompt, r.json()["choices"][0]["text"]))
        assert sched.stats.prefix_hits == 1 and sched.stats.prefix_reused_tokens > 500
        for prompt, text in answers:
            assert text == embedded.generate(prompt, max_tokens=8, temperature=0).text
        r = httpx.post(live.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 30000}, timeout=60)
        assert r.status_code == 400 and "KV budget" in r.json()["error"]["message"]
    finally:
        live.stop()


def test_usage_reports_the_reused_prefix_as_cached_tokens(embedded):
    """usage.prompt_tokens_details.cached_tokens, as the openai client reads it: 0 on a first request,
    the prefix store's reused tokens on a second question about the same document (streamed too)."""
    live = LiveServer(create_app(embedded, model_name="m", max_batch=1, prefix_cache_bytes=2**30))
    try:
        sched = live.app.state.engine
        client = live.client()
        doc = " ".join(f"Line {i} says the tide is {['high', 'low'][i % 2]}." for i in range(80))  # > 512 tokens
        first = client.completions.create(model="m", prompt=doc + "\nIs the tide high?", max_tokens=2,
                                          temperature=0)
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        stream = client.completions.create(model="m", prompt=doc + "\nIs the tide low?", max_tokens=2,
                                           temperature=0, stream=True, stream_options={"include_usage": True})
        usage = [chunk.usage for chunk in stream if chunk.usage is not None]
        assert len(usage) == 1
        reused = sched.stats.prefix_reused_tokens
        assert sched.stats.prefix_hits == 1 and reused == 512 < usage[0].prompt_tokens
        assert usage[0].prompt_tokens_details.cached_tokens == reused
        chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=1)
        # only the BOS token is shared with the document: nothing reused (an entry resumes at a grid point
        # of the prefill's chunks or not at all)
        assert chat.usage.prompt_tokens_details.cached_tokens == 0 == sched.stats.prefix_reused_tokens - reused
    finally:
        live.stop()
