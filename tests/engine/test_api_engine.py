"""The Python API over the engine: what the server offers (prefix reuse, logprobs, structured output, int8 KV,
speculation) reaches Model.generate with the server's argument names."""

import json

import jsonschema
import pytest
import torch

import gemma4
from gemma4.engine import Engine, Request
from gemma4.sampling import SamplingParams
from reference import build_gemma4
from test_structured import SMALL, json_schema, tiny_model  # noqa: F401 (a fixture)

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def embedded():
    return gemma4.load(progress=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("api_engine")
    build_gemma4(path, "moe_kv", seed=4)
    return path


def _document(tokenizer, tokens: int) -> str:
    words = "river stone bridge harvest council merchant tower archive ledger harbour lantern orchard".split()
    text, i = "", 0
    while len(tokenizer.encode(text)) < tokens:
        text += " ".join(words[(i + j * 7) % len(words)] for j in range(9)).capitalize() + ". "
        i += 1
    return text


def test_a_second_generate_over_a_long_document_reuses_it_and_answers_as_a_fresh_model(embedded):
    doc = _document(embedded.tokenizer, 1200)  # longer than two 512-token prefill chunks
    first = embedded.generate(doc + "\n\nQuestion: which word comes first? Answer:", max_tokens=8, **GREEDY)
    assert first.cached_tokens == 0
    prompt = doc + "\n\nQuestion: what is the last word? Answer:"
    second = embedded.generate(prompt, max_tokens=8, **GREEDY)
    assert second.cached_tokens >= 512 and second.cached_tokens % 512 == 0
    fresh = gemma4.load(progress=False).generate(prompt, max_tokens=8, **GREEDY)
    assert fresh.cached_tokens == 0
    assert second.token_ids == fresh.token_ids and second.text == fresh.text
    # chat reports it too
    messages = [{"role": "user", "content": doc + "\n\nWhich word comes first?"}]
    embedded.chat(messages, max_tokens=2, **GREEDY)
    messages[0]["content"] = doc + "\n\nWhich word comes last?"
    assert embedded.chat(messages, max_tokens=2, **GREEDY).cached_tokens >= 512


def test_logprobs_are_the_models_own(tiny):
    model = gemma4.load(tiny, progress=False)
    prompt = [5, 9, 14, 3, 22, 7]
    out = model.generate(prompt, max_tokens=6, logprobs=3, **GREEDY)
    assert len(out.logprobs) == len(out.token_ids) == 6
    # the oracle: a full forward over the prompt and the answer, log-softmaxed
    logp = torch.log_softmax(model.forward(prompt + out.token_ids[:-1]).float(), dim=-1)[len(prompt) - 1:]
    for i, (token, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(float(logp[i, token]), abs=1e-4)
        assert [t for t, _ in lp.top] == torch.topk(logp[i], 3).indices.tolist()
        assert lp.top[0][0] == token  # greedy: the chosen token is the most likely
    streamed = [s.logprob for s in model.generate(prompt, max_tokens=6, logprobs=0, stream=True, **GREEDY)]
    assert [lp.logprob for lp in streamed] == pytest.approx([lp.logprob for lp in out.logprobs], abs=1e-6)
    assert all(lp.top == [] for lp in streamed)
    assert model.generate(prompt, max_tokens=2, **GREEDY).logprobs is None


@pytest.mark.parametrize("seed", [None, 1, 2])
def test_response_format_gives_a_valid_document(tiny_model, seed):  # noqa: F811
    opts = dict(temperature=0) if seed is None else dict(seed=seed, temperature=1.0)
    out = tiny_model.generate("the cat is", max_tokens=400, response_format=json_schema(SMALL), **opts)
    jsonschema.validate(json.loads(out.text), SMALL)
    assert out.finish_reason == "stop"


def test_int8_kv_through_the_api_is_the_servers_int8_kv(tiny):
    model = gemma4.load(tiny, progress=False, kv_cache="int8")
    assert model.engine.cache.kv_dtype == "int8"
    prompt = [5, 9, 14, 3, 22, 7] * 4
    got = model.generate(prompt, max_tokens=12, **GREEDY)
    server = Engine(model, max_batch=2, kv_dtype="int8")  # as create_app(kv_cache="int8") builds it
    want = [out.token_id for _, out in server.generate([Request(prompt, SamplingParams(max_tokens=12, **GREEDY))])]
    assert got.token_ids == want
    with pytest.raises(ValueError, match="kv_cache"):
        gemma4.load(tiny, progress=False, kv_cache="int4")


def test_greedy_prompt_lookup_through_the_api_is_token_identical(embedded):
    passage = ("The lighthouse keeper wrote in the ledger every evening: the wind, the ships that passed, the oil "
               "burned, and the names of the gulls he had come to know. ")
    prompt = passage * 3 + "Copy the passage above once more, word for word:\n\n"
    plain = embedded.generate(prompt, max_tokens=60, **GREEDY)
    fast = embedded.generate(prompt, max_tokens=60, speculative=5, **GREEDY)
    assert fast.token_ids == plain.token_ids
    assert fast.drafted_tokens > 0 and fast.accepted_tokens > 0
    streamed = [s.token_id for s in embedded.generate(prompt, max_tokens=60, speculative=5, stream=True, **GREEDY)]
    assert streamed == plain.token_ids


def test_the_engine_has_a_row_per_prompt_of_the_widest_call_and_keeps_its_prefix_store(tiny):
    """Each row holds a sliding window of KV per sliding layer: one prompt at a time keeps one row, a batch
    widens the engine (up to max_batch), and what the store holds survives the change."""
    model = gemma4.load(tiny, progress=False, max_batch=4)
    prompt = list(range(3, 40))
    alone = model.generate(prompt, max_tokens=3, **GREEDY)
    engine = model.engine
    assert engine.max_batch == 1
    batch = model.generate([prompt, prompt[:20], prompt[:30]], max_tokens=3, **GREEDY)
    assert model.engine.max_batch == 3 and model.engine.prefix_store is engine.prefix_store
    assert batch[0].token_ids == alone.token_ids
    model.generate([prompt] * 6, max_tokens=1, **GREEDY)
    assert model.engine.max_batch == 4  # max_batch caps it; the other prompts wait for a row
    model.generate(prompt, max_tokens=1, **GREEDY)
    assert model.engine.max_batch == 4  # never narrowed again


def test_a_bad_seed_is_refused_before_it_reaches_the_engine(tiny):
    model = gemma4.load(tiny, progress=False)
    stream = model.generate([5, 9, 14], max_tokens=4, stream=True, **GREEDY)
    first = next(stream)
    for seed in (2**64, -1, 1.5, "7"):
        with pytest.raises(ValueError, match="seed"):
            model.generate([5, 9, 14], max_tokens=2, temperature=0.8, seed=seed)
    rest = list(stream)  # the open stream is not failed by the refused call
    assert [first.token_id] + [s.token_id for s in rest] == model.generate([5, 9, 14], max_tokens=4, **GREEDY).token_ids


def test_two_threads_on_one_model_get_what_each_gets_alone(tiny):
    """Calls from two threads step the same engine one step at a time; each gets its own answer."""
    import threading

    model = gemma4.load(tiny, progress=False, max_batch=2)
    prompts = [list(range(3, 30)), list(range(40, 61))]
    alone = [model.generate(p, max_tokens=12, **GREEDY).token_ids for p in prompts]
    got = [None, None]

    def run(i):
        got[i] = model.generate(prompts[i], max_tokens=12, **GREEDY).token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == alone
