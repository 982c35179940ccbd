"""Images through the OpenAI API: data: URLs in content parts; remote URLs only when allowed."""

import base64

import httpx
import pytest

import gemma4
from gemma4.server import create_app
from test_server import LiveServer
from vision_reference import build_multimodal, encoded, picture, png_bomb


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    path = tmp_path_factory.mktemp("mm")
    build_multimodal(path, seed=3, name="dense_kv", bidirectional="vision")
    model = gemma4.load(path)
    server = LiveServer(create_app(model, model_name="mm", max_batch=2))
    yield model, server
    server.stop()


def _url(img):
    return "data:image/png;base64," + base64.b64encode(encoded(img, "PNG")).decode()


def test_images_in_chat_give_what_the_engine_gives(live):
    model, server = live
    content = [{"type": "text", "text": "Compare"}, {"type": "image_url", "image_url": {"url": _url(picture(40, 30, 1))}},
               {"type": "text", "text": "and"}, {"type": "image_url", "image_url": {"url": _url(picture(16, 48, 2))}}]
    messages = [{"role": "user", "content": content}]
    r = server.client().chat.completions.create(model="mm", messages=messages, max_tokens=5, temperature=0)
    expected = model.generate(model.chat_input(messages), max_tokens=5, temperature=0)
    assert r.usage.prompt_tokens == expected.prompt_tokens > 70  # the soft tokens are in the prompt
    assert r.choices[0].message.content == expected.text


@pytest.mark.parametrize("part,words", [
    ({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, "not fetched"),
    ({"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}, "scheme"),
    ({"type": "image", "image": "/etc/passwd"}, "not accepted"),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, "image"),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png_bomb()).decode()}},
     "too large"),
])
def test_refused_images_are_400(live, part, words):
    _, server = live
    r = httpx.post(server.url + "/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": [part]}], "max_tokens": 2})
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text


def test_prefix_reuse_keys_images_by_their_pixels(tmp_path_factory):
    from gemma4.kv import PrefixStore
    from gemma4.engine import Engine

    path = tmp_path_factory.mktemp("mm-prefix")
    build_multimodal(path, seed=4, name="dense_kv", bidirectional="vision")
    model = gemma4.load(path)
    sched = Engine(model, max_batch=1, prefix_store=PrefixStore(2**30, block_tokens=16))
    server = LiveServer(create_app(model, model_name="mm", engine=sched))
    try:
        def ask(img, question):
            content = [{"type": "image_url", "image_url": {"url": _url(img)}}, {"type": "text", "text": question}]
            messages = [{"role": "user", "content": content}]
            r = server.client().chat.completions.create(model="mm", messages=messages, max_tokens=4, temperature=0)
            alone = model.generate(model.chat_input(messages), max_tokens=4, temperature=0)
            assert r.choices[0].message.content == alone.text
            return sched.stats.prefix_reused_tokens

        a, b = picture(40, 30, 1), picture(40, 30, 2)  # same size: same placeholder tokens
        assert ask(a, "What is it?") == 0
        reused = ask(a, "And its colour?")
        assert reused > 70  # the image's soft tokens came from the cache
        assert ask(b, "What is it?") - reused < 70  # another image of the same size does not reuse them
    finally:
        server.stop()


def test_an_image_to_a_text_only_model_is_400_and_the_server_keeps_serving():
    from gemma4 import store

    server = LiveServer(create_app(gemma4.load(store.embedded_path()), model_name="text", max_batch=1))
    try:
        part = {"type": "image_url", "image_url": {"url": _url(picture(16, 16, 1))}}
        r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                       json={"messages": [{"role": "user", "content": [part]}], "max_tokens": 2})
        assert r.status_code == 400 and "no vision tower" in r.json()["error"]["message"], r.text
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200
    finally:
        server.stop()
