"""/tokenize and /detokenize in llama-server's and vLLM's shapes, checked against llama.cpp's own ids for the
embedded model; /v1/models' context length, sizes and capabilities."""

import json

import httpx
import pytest

import gemma4
from gemma4 import store
from gemma4.checkpoint.gguf_file import GGUFFile
from gemma4.server import create_app
from paths import DATA
from test_server import LiveServer, gemma4_tiny  # noqa: F401

LLAMACPP = json.loads((DATA / "llamacpp_token_ids.json").read_text(encoding="utf-8"))["gemma3"]
CASES = [c for c in LLAMACPP if c["text"]][:8]


@pytest.fixture(scope="module")
def server():
    live = LiveServer(create_app(gemma4.load(store.embedded_path()), model_name="gemma3-270m", max_batch=1,
                                 api_key="k"))
    yield live
    live.stop()


def post(server, path, body, key="k"):
    return httpx.post(server.url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)


@pytest.mark.parametrize("case", CASES, ids=lambda c: repr(c["text"][:20]))
def test_tokenize_gives_llamacpps_ids(server, case):
    """llama.cpp's ids carry BOS (add_bos=True): llama-server's add_special and vLLM's add_special_tokens."""
    ids = case["ids"]
    assert post(server, "/tokenize", {"content": case["text"], "add_special": True}).json()["tokens"] == ids
    assert post(server, "/tokenize", {"content": case["text"]}).json()["tokens"] == ids[1:]  # llama-server: off
    vllm = post(server, "/tokenize", {"prompt": case["text"]}).json()  # vLLM: on
    assert vllm == {"tokens": ids, "count": len(ids), "max_model_len": 32768}
    assert post(server, "/tokenize", {"prompt": case["text"], "add_special_tokens": False}).json()["tokens"] == ids[1:]
    detok = post(server, "/detokenize", {"tokens": ids[1:]}).json()
    assert detok == {"content": case["detokenized"], "prompt": case["detokenized"]}


def test_pieces_spell_the_text(server):
    text = next(c["text"] for c in LLAMACPP if any(ord(ch) > 0x2000 for ch in c["text"]))  # emoji / CJK: byte pieces
    r = post(server, "/tokenize", {"content": text, "with_pieces": True}).json()
    ids = next(c["ids"] for c in LLAMACPP if c["text"] == text)
    assert [t["id"] for t in r["tokens"]] == ids[1:]
    spelled = b"".join(bytes(p) if isinstance(p, list) else p.encode() for p in (t["piece"] for t in r["tokens"]))
    assert spelled.decode() == text


def test_tokenize_a_conversation_as_vllm_does(server):
    model = gemma4.load(store.embedded_path())
    messages = [{"role": "user", "content": "Hi there"}]
    r = post(server, "/tokenize", {"messages": messages}).json()
    expected = model.tokenizer.encode(model.chat_prompt(messages), add_special_tokens=False)
    assert r["tokens"] == expected and r["count"] == len(expected)


@pytest.mark.parametrize("path,body,status,words", [
    ("/tokenize", {}, 400, "give one of content"),
    ("/tokenize", {"content": "a", "prompt": "b"}, 400, "not content and prompt"),
    ("/tokenize", {"content": 5}, 400, "content"),
    ("/tokenize", {"messages": []}, 400, "at least one message"),
    ("/detokenize", {"tokens": [1, 10 ** 9]}, 400, "is not a token id"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
    ("/detokenize", {}, 400, "tokens: a required field is missing"),
    ("/tokenize", {"content": "a", "model": "other"}, 404, "does not exist"),
])
def test_bad_requests_are_4xx_with_a_message(server, path, body, status, words):
    r = post(server, path, body)
    assert r.status_code == status and words in r.json()["error"]["message"], r.text


def test_the_key_is_required(server):
    assert post(server, "/tokenize", {"content": "a"}, key="wrong").status_code == 401


def test_models_carry_context_sizes_and_capabilities(server):
    card = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer k"}).json()["data"][0]
    path = store.embedded_path()
    context = GGUFFile(path).metadata["gemma3.context_length"]
    assert card["max_model_len"] == card["meta"]["n_ctx_train"] == context
    assert round(card["meta"]["n_params"] / 1e6, 2) == 268.10  # llama.cpp's and Ollama's count for it
    assert 0.9 * path.stat().st_size < card["meta"]["size"] < path.stat().st_size
    assert card["capabilities"] == ["completion", "chat"]  # Gemma 3 270M: text only, no tool-call format


def test_a_gemma4_model_says_tools_and_thinking(gemma4_tiny):  # noqa: F811
    live = LiveServer(create_app(gemma4_tiny, model_name="g4", max_batch=1))
    try:
        card = httpx.get(live.url + "/v1/models/g4").json()
    finally:
        live.stop()
    assert card["capabilities"] == ["completion", "chat", "tools", "thinking"]
