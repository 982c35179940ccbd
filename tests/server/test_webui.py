"""The chat page at / of `gemma4 serve`, in a real browser: Debian's chromium, headless, driven by selenium
through the system chromedriver, against the live server (`gemma4 serve` on the embedded model, with an API
key). What the page shows is checked against what the server's API answers to the same request."""

import base64
import io
import json
import time
import wave

import httpx
import pytest

import gemma4
from gemma4.server import create_app
from scripted import Thinker, running_output
from test_server import LiveServer
from webpage import (KEY, LAST, NAME, api, ask, driver, errors, fresh, kept, running, screenshot,  # noqa: F401
                     server, set_field, wait, watch)

LONG = "Count from 1 to 500, separated by commas."  # the embedded model loops on it, greedily: no early end


def test_the_page_and_its_files_need_no_key_but_the_api_does(server):
    page = httpx.get(server + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]  # no script or fetch from elsewhere
    for name in ("app.js", "api.js", "markdown.js", "store.js", "attach.js", "style.css"):
        assert httpx.get(f"{server}/static/{name}").status_code == 200, name
    assert httpx.get(server + "/v1/models").status_code == 401


def test_the_page_asks_for_the_key_then_loads_without_console_errors(driver, server):
    fresh(driver, server, key=None, ready=False)
    wait(driver, "return document.getElementById('key-dialog').open", 20)
    driver.find_element("id", "key").send_keys(KEY)
    driver.find_element("id", "key-save").click()
    assert wait(driver, "return [...document.querySelectorAll('#model option')].map(o => o.value).join()") == NAME
    # the one refusal before the key is the browser's own report of the 401, nothing from the page
    assert all("401" in e for e in errors(driver)), errors(driver)
    assert driver.execute_script("return localStorage.getItem('gemma4.apiKey')") == KEY
    driver.refresh()
    wait(driver, "return document.querySelector('#model option')")
    assert not driver.execute_script("return document.getElementById('key-dialog').open")
    assert errors(driver) == []


def test_a_message_gets_the_streamed_greedy_answer(driver, server, tmp_path):
    fresh(driver, server)
    set_field(driver, "temperature", 0)
    set_field(driver, "max-tokens", 40)
    ask(driver, "Write a short poem about the sea.")
    lengths = watch(driver)
    final = driver.execute_script(LAST + "return [m.dataset.state, m.querySelector('.answer').textContent]")
    assert final[0] == "done", driver.execute_script(LAST + "return m.querySelector('.error').textContent")
    # streamed: the text grew over several looks before the answer was complete
    growing = sorted(set(lengths))
    assert len(growing) >= 3 and growing == list(dict.fromkeys(lengths)) and growing[-1] <= len(final[1])
    direct = api(server, {"model": NAME, "messages": [{"role": "user", "content": "Write a short poem about the sea."}],
                          "temperature": 0, "top_p": 0.95, "max_tokens": 40,
                          "chat_template_kwargs": {"enable_thinking": False}})
    expected = direct["choices"][0]["message"]["content"]
    assert kept(driver)[0]["messages"][1]["content"] == expected
    shown = driver.execute_async_script(
        "import('/static/markdown.js').then(md => { const d = document.createElement('div');"
        " d.innerHTML = md.renderMarkdown(arguments[0]); arguments[1](d.textContent); })", expected)
    assert final[1] == shown
    assert errors(driver) == []
    screenshot(driver, tmp_path)


def test_stop_ends_the_answer_and_the_server_stops_generating(driver, server):
    fresh(driver, server)
    set_field(driver, "temperature", 0)
    set_field(driver, "max-tokens", 3000)
    ask(driver, LONG)
    wait(driver, LAST + "return m.querySelector('.answer').textContent.length > 20", 60)
    assert running(server) == 1
    driver.find_element("id", "stop").click()
    wait(driver, LAST + "return m.dataset.state === 'stopped'", 10)
    length = driver.execute_script(LAST + "return m.querySelector('.answer').textContent.length")
    # the server noticed the closed connection and freed the row
    deadline = time.time() + 15
    while running(server):
        assert time.time() < deadline, "the server kept generating after stop"
        time.sleep(0.1)
    time.sleep(0.5)
    assert driver.execute_script(LAST + "return m.querySelector('.answer').textContent.length") == length
    assert driver.execute_script("return [document.getElementById('send').hidden, document.getElementById('stop').hidden]") \
        == [False, True]
    assert kept(driver)[0]["messages"][1]["stopped"] is True
    # ready for the next message, whose history holds the stopped answer as far as it went
    set_field(driver, "max-tokens", 3)
    ask(driver, "Thanks.")
    watch(driver)
    assert driver.execute_script(LAST + "return m.dataset.state") == "done"
    assert errors(driver) == []


def test_a_conversation_survives_a_reload_and_can_be_deleted(driver, server):
    fresh(driver, server)
    set_field(driver, "max-tokens", 4)
    ask(driver, "Hello there")
    watch(driver)
    before = driver.execute_script("return [...document.querySelectorAll('.msg')].map(m => m.textContent)")
    driver.find_element("id", "new-chat").click()
    assert driver.execute_script("return document.querySelectorAll('.msg').length") == 0
    driver.refresh()
    wait(driver, "return document.querySelector('#model option')")
    titles = driver.execute_script("return [...document.querySelectorAll('#conversations .pick')].map(b => b.textContent)")
    assert "Hello there" in titles
    driver.find_elements("css selector", "#conversations .pick")[titles.index("Hello there")].click()
    assert driver.execute_script("return [...document.querySelectorAll('.msg')].map(m => m.textContent)") == before
    # deleted in a second tab: the first tab's list follows, and a reload agrees
    first = driver.current_window_handle
    driver.switch_to.new_window("tab")
    driver.get(server + "/")
    wait(driver, "return document.querySelector('#model option')")
    driver.execute_script("document.querySelector('#conversations li.active .delete').click()")
    driver.close()
    driver.switch_to.window(first)
    titles = "return [...document.querySelectorAll('#conversations .pick')].map(b => b.textContent)"
    wait(driver, titles.replace("return ", "return !") + ".includes('Hello there')", 10)
    assert driver.execute_script("return document.querySelectorAll('.msg').length") == 0
    driver.refresh()
    wait(driver, "return document.querySelector('#model option')")
    assert "Hello there" not in driver.execute_script(titles)


def test_a_stream_cut_short_is_an_error_not_a_finished_answer(driver, server):
    """The page's own reading of server-sent events, fed by a stand-in for fetch: events split across reads
    and CRLF line ends are put together, and a stream that ends without [DONE] is not taken for a whole answer."""
    fresh(driver, server)
    driver.execute_script("""
        const real = window.fetch;
        window.fetch = (url, init) => {
          if (!String(url).endsWith('chat/completions')) return real(url, init);
          const pieces = ['data: {"choices":[{"index":0,"delta":{"content":"Half a', 'n"}}]}\\r\\n\\r\\ndata: {"choi',
                          'ces":[{"index":0,"delta":{"content":" answer"}}]}\\n\\n'];
          const body = new ReadableStream({start(c) {
            for (const p of pieces) c.enqueue(new TextEncoder().encode(p));
            c.close();
          }});
          return Promise.resolve(new Response(body, {headers: {'Content-Type': 'text/event-stream'}}));
        };""")
    ask(driver, "Hello")
    watch(driver)
    assert driver.execute_script(LAST + "return [m.dataset.state, m.querySelector('.answer').textContent, "
                                        "m.querySelector('.error').textContent]") \
        == ["error", "Half an answer", "the connection closed before the answer was complete"]


@pytest.mark.parametrize("capabilities,disabled", [(["completion", "chat"], True), (["chat", "thinking"], False),
                                                   (None, False)])
def test_thinking_can_be_switched_on_only_where_the_model_card_allows(driver, server, capabilities, disabled):
    """/v1/models' capabilities (Ollama's names), where the server lists them: a stand-in for the card, set
    before the page's scripts run."""
    card = {"id": NAME, "object": "model", **({"capabilities": capabilities} if capabilities else {})}
    stub = driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": """
        const real = window.fetch;
        window.fetch = (url, init) => String(url).endsWith('v1/models')
          ? Promise.resolve(new Response(JSON.stringify({object: 'list', data: [%s]})))
          : real(url, init);""" % json.dumps(card)})
    try:
        fresh(driver, server)
        assert driver.execute_script("return document.getElementById('thinking').disabled") is disabled
    finally:
        driver.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", {"identifier": stub["identifier"]})


def test_a_narrow_window_reaches_the_sidebar_through_a_button(driver, server):
    size = driver.get_window_size()
    driver.set_window_size(480, 800)
    try:
        fresh(driver, server)
        shown = "return getComputedStyle(document.getElementById('sidebar')).display !== 'none'"
        assert not driver.execute_script(shown)
        driver.find_element("id", "toggle-sidebar").click()
        assert driver.execute_script(shown)
        driver.find_element("css selector", "#conversations .pick").click()
        assert not driver.execute_script(shown)
    finally:
        driver.set_window_size(size["width"], size["height"])


def png() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 40, 40)).save(out, "PNG")
    return out.getvalue()


def wav() -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(b"\x00\x01" * 1600)
    return out.getvalue()


def test_audio_the_api_does_not_take_is_sent_as_wav(driver, server):
    """Audio in another format is decoded by the browser and sent as 16 kHz 16-bit WAV. A WAV file under
    another name and type stands in for it (the browser decodes by content); its samples come back within
    one step of 16-bit (the page scales negative and positive halves by 32768 and 32767)."""
    import numpy as np

    rate = 16000
    samples = (np.sin(np.arange(rate // 10) * 2 * np.pi * 440 / rate) * 12000).astype("<i2")
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes(samples.tobytes())
    fresh(driver, server)
    driver.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], 'tone.ogg', {type: 'audio/ogg'}));
        document.getElementById('messages').dispatchEvent(new DragEvent('drop', {dataTransfer: data, bubbles: true}));
    """, base64.b64encode(out.getvalue()).decode())
    wait(driver, "return document.querySelector('#attachments audio')", 10)
    ask(driver, "Hear this.")
    wait(driver, LAST + "return m.dataset.state !== 'streaming'", 30)
    sent = kept(driver)[0]["messages"][0]["attachments"][0]
    assert (sent["name"], sent["format"]) == ("tone.ogg", "wav")
    with wave.open(io.BytesIO(base64.b64decode(sent["data"]))) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, rate)
        back = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    assert len(back) == len(samples) and np.abs(back.astype(int) - samples).max() <= 1


def test_attachments_are_shown_and_the_servers_refusal_is_shown(driver, server, tmp_path):
    fresh(driver, server)
    image = tmp_path / "red.png"
    image.write_bytes(png())
    driver.find_element("id", "file").send_keys(str(image))  # the file picker
    wait(driver, "return document.querySelector('#attachments img')", 10)
    ask(driver, "What is this?")
    wait(driver, LAST + "return m.dataset.state !== 'streaming'", 30)
    assert driver.execute_script("return document.querySelector('.msg.user img').naturalWidth") == 32
    url = "data:image/png;base64," + base64.b64encode(png()).decode()
    refusal = api(server, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}]}]}, 400)
    assert driver.execute_script(LAST + "return [m.dataset.state, m.querySelector('.error').textContent]") \
        == ["error", refusal["error"]["message"]]

    # audio, dropped on the page (a drop event carrying the file, as the browser makes one)
    driver.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], 'tone.wav', {type: 'audio/wav'}));
        document.getElementById('messages').dispatchEvent(new DragEvent('drop', {dataTransfer: data, bubbles: true}));
    """, base64.b64encode(wav()).decode())
    wait(driver, "return document.querySelector('#attachments audio')", 10)
    ask(driver, "What is this?")
    wait(driver, LAST + "return m.dataset.state !== 'streaming'", 30)
    audio = {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav()).decode(), "format": "wav"}}
    # the history before it: the failed image turn is left out, as the page leaves it out
    direct = httpx.post(server + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                        json={"messages": [{"role": "user", "content": [audio, {"type": "text", "text": "What is this?"}]}],
                              "max_tokens": 4})
    shown = driver.execute_script(LAST + "return [m.dataset.state, m.querySelector('.error').textContent]")
    if direct.status_code == 200:  # a server that takes audio: the page streams the answer instead
        assert shown[0] == "done"
    else:
        assert shown == ["error", direct.json()["error"]["message"]]


THOUGHT = "the cat is on the mat and the dog is in the den"


@pytest.fixture()
def thinker(chat_gguf, monkeypatch):
    """A server (no key) whose model thinks THOUGHT, then answers, whatever it is asked."""
    model = gemma4.load(chat_gguf)
    live = LiveServer(create_app(model, model_name="g4", max_batch=1))
    monkeypatch.setattr(model.decoder, "logits", Thinker(model, THOUGHT, "It is *on* the mat.",
                                                          running_output(live.app.state.engine)))
    yield live
    live.stop()


def test_thinking_is_shown_folded_apart_from_the_answer(driver, thinker):
    fresh(driver, thinker.url, key=None)
    driver.find_element("id", "thinking").click()
    set_field(driver, "max-tokens", 200)
    ask(driver, "Where is the cat?")
    watch(driver)
    r = httpx.post(thinker.url + "/v1/chat/completions", timeout=60, json={
        "model": "g4", "messages": [{"role": "user", "content": "Where is the cat?"}], "max_tokens": 200,
        "chat_template_kwargs": {"enable_thinking": True}}).json()["choices"][0]["message"]
    assert r["reasoning_content"] and r["content"] == "It is *on* the mat."
    shown = driver.execute_script(LAST + """const t = m.querySelector('details.thinking');
        return [m.dataset.state, t.open, t.querySelector('summary').textContent, t.querySelector('.reasoning').textContent,
                m.querySelector('.answer').innerHTML]""")
    assert shown == ["done", False, "Thought", r["reasoning_content"], "<p>It is <em>on</em> the mat.</p>"]
    driver.execute_script("document.querySelector('details.thinking summary').click()")  # unfolds on a click
    assert driver.execute_script("return document.querySelector('details.thinking').open")
    assert errors(driver) == []


NASTY = """# Title <b>x</b>
<script>alert(1)</script> <img src=x onerror=alert(1)>

**bold**, *it*, `<b>code</b>` and snake_case_name
on two lines

- one
- two
  - nested
1. first
2. second

```html
<iframe src="javascript:alert(1)"></iframe>
```
[ok](https://example.com/a?b=1&c=2) [bad](javascript:alert(1)) [q](https://x.y/"onmouseover=alert(1))"""


def test_markdown_is_rendered_and_the_models_html_never_is(driver, server):
    fresh(driver, server)
    shape = driver.execute_async_script("""
        import('/static/markdown.js').then(md => {
          const d = document.createElement('div');
          d.innerHTML = md.renderMarkdown(arguments[0]);
          const all = [...d.querySelectorAll('*')];
          const open = document.createElement('div');
          open.innerHTML = md.renderMarkdown('Streaming:\\n```py\\nprint(1)\\n');
          arguments[1]({
            tags: [...new Set(all.map(e => e.tagName))].sort(),
            attributes: [...new Set(all.flatMap(e => [...e.attributes].map(a => a.name)))].sort(),
            links: [...d.querySelectorAll('a')].map(a => [a.textContent, a.getAttribute('href')]),
            h1: d.querySelector('h1').textContent, strong: d.querySelector('strong').textContent,
            em: [...d.querySelectorAll('em')].map(e => e.textContent), code: d.querySelector('p code').textContent,
            pre: d.querySelector('pre code').textContent, lang: d.querySelector('pre code').className,
            items: [...d.querySelectorAll('li')].length, nested: d.querySelectorAll('ul ul li').length,
            ol: d.querySelectorAll('ol li').length, text: d.textContent,
            open: open.querySelector('pre code')?.textContent,
          });
        })""", NASTY)
    assert shape["tags"] == sorted(["A", "BR", "CODE", "EM", "H1", "LI", "OL", "P", "PRE", "STRONG", "UL"])
    assert shape["attributes"] == ["class", "href", "rel", "target"]  # no on* handler, no src
    assert shape["links"] == [["ok", "https://example.com/a?b=1&c=2"], ["q", 'https://x.y/"onmouseover=alert(1']]
    assert shape["h1"] == "Title <b>x</b>" and shape["strong"] == "bold" and shape["em"] == ["it"]
    assert shape["code"] == "<b>code</b>" and "snake_case_name" in shape["text"]
    assert shape["pre"] == '<iframe src="javascript:alert(1)"></iframe>' and shape["lang"] == "language-html"
    assert (shape["items"], shape["nested"], shape["ol"]) == (5, 1, 2)
    assert "<script>alert(1)</script>" in shape["text"] and "[bad](javascript:alert(1))" in shape["text"]
    assert shape["open"] == "print(1)"  # a fence still streaming is already code
