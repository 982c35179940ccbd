"""Generation: batches, sampling, stop conditions."""

import pytest
import torch

import gemma4
from gemma4.sampling import SamplingParams, process_logits
from reference import VOCAB


def _prompts():
    g = torch.Generator().manual_seed(2)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (3, 17, 9, 30)]


def test_batch_equals_alone(gemma4_models):
    for name in ("moe_kv", "dense_kv_off"):
        model = gemma4.load(gemma4_models[name][0])
        prompts = _prompts()
        batch = model.generate(prompts, max_tokens=20, temperature=0, ignore_eos=True)
        for prompt, got in zip(prompts, batch):
            alone = model.generate(prompt, max_tokens=20, temperature=0, ignore_eos=True)
            assert got.token_ids == alone.token_ids


def test_batch_sampling_with_seed_equals_alone(gemma4_models):
    model = gemma4.load(gemma4_models["moe_kv"][0])
    prompts = _prompts()
    batch = model.generate(prompts, max_tokens=12, temperature=0.9, top_k=20, top_p=0.9, seed=11, ignore_eos=True)
    for prompt, got in zip(prompts, batch):
        alone = model.generate(prompt, max_tokens=12, temperature=0.9, top_k=20, top_p=0.9, seed=11, ignore_eos=True)
        assert got.token_ids == alone.token_ids


def test_seed_reproducible_and_varies(gemma4_models):
    model = gemma4.load(gemma4_models["moe_kv"][0])
    prompt = _prompts()[1]
    a = model.generate(prompt, max_tokens=24, temperature=1.5, top_k=0, top_p=1.0, seed=1, ignore_eos=True)
    b = model.generate(prompt, max_tokens=24, temperature=1.5, top_k=0, top_p=1.0, seed=1, ignore_eos=True)
    c = model.generate(prompt, max_tokens=24, temperature=1.5, top_k=0, top_p=1.0, seed=2, ignore_eos=True)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_filters_that_keep_one_token_are_greedy(gemma4_models):
    model = gemma4.load(gemma4_models["dense_kv"][0])
    prompt = _prompts()[2]
    greedy = model.generate(prompt, max_tokens=16, temperature=0, ignore_eos=True).token_ids
    for kw in (dict(top_k=1), dict(top_k=0, top_p=1e-6), dict(top_k=0, top_p=1.0, min_p=1.0)):
        got = model.generate(prompt, max_tokens=16, temperature=1.0, seed=3, ignore_eos=True, **kw).token_ids
        assert got == greedy, kw


def test_process_logits():
    logits = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.1]))
    kept = lambda **kw: torch.isfinite(process_logits(logits, SamplingParams(temperature=1.0, **kw))).tolist()
    assert kept(top_k=2, top_p=1.0) == [True, True, False, False]
    assert kept(top_k=0, top_p=0.7) == [True, True, False, False]  # 0.5 < 0.7, 0.75 >= 0.7
    assert kept(top_k=0, top_p=0.5) == [True, False, False, False]
    assert kept(top_k=0, top_p=1.0, min_p=0.35) == [True, True, False, False]  # 0.15 < 0.35 * 0.5
    scaled = process_logits(logits, SamplingParams(temperature=0.5, top_k=0, top_p=1.0))
    assert torch.allclose(scaled, logits * 2)


def test_sampling_follows_the_distribution():
    """With no filter, sampled frequencies follow softmax(logits / T) (4-sigma binomial bounds)."""
    from gemma4.sampling import sample

    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    params = SamplingParams(temperature=0.7, top_k=0, top_p=1.0)
    g = torch.Generator().manual_seed(0)
    n = 4000
    counts = torch.bincount(torch.tensor([sample(logits, params, g) for _ in range(n)]), minlength=4).float()
    p = torch.softmax(logits / 0.7, dim=-1)
    sigma = (n * p * (1 - p)).sqrt()
    assert ((counts - n * p).abs() <= 4 * sigma).all()


def test_bad_sampling_params():
    for kw in (dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-1), dict(min_p=2)):
        with pytest.raises(ValueError):
            SamplingParams(**kw)


def test_eos_and_stop_tokens(gemma4_models):
    model = gemma4.load(gemma4_models["moe_kv"][0])
    prompt = _prompts()[0]
    free = model.generate(prompt, max_tokens=30, temperature=0, ignore_eos=True).token_ids
    stop_at = free[10]
    first = free.index(stop_at)
    got = model.generate(prompt, max_tokens=30, temperature=0, stop_token_ids=[stop_at])
    assert got.token_ids == free[:first + 1] and got.finish_reason == "stop"


def test_stop_strings_and_text(model_with_tokenizer):
    model = model_with_tokenizer
    free = model.generate("hello world", max_tokens=40, temperature=0, ignore_eos=True)
    assert free.text == model.tokenizer.decode(free.token_ids)
    stop = free.text[12:15]
    cut = free.text.index(stop)
    got = model.generate("hello world", max_tokens=40, temperature=0, stop=[stop])
    assert got.text == free.text[:cut] and got.finish_reason == "stop"
    streamed = "".join(c.text for c in model.generate("hello world", max_tokens=40, temperature=0, stop=[stop],
                                                      stream=True))
    assert streamed == got.text


def test_stream_equals_whole(model_with_tokenizer):
    model = model_with_tokenizer
    whole = model.generate(["abc", "a longer prompt"], max_tokens=25, temperature=0, ignore_eos=True)
    parts = {0: "", 1: ""}
    for chunk in model.generate(["abc", "a longer prompt"], max_tokens=25, temperature=0, ignore_eos=True,
                                stream=True):
        parts[chunk.index] += chunk.text
    assert [parts[0], parts[1]] == [w.text for w in whole]


def test_bad_generate_input(gemma4_models):
    model = gemma4.load(gemma4_models["moe_kv"][0])
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate("text without a tokenizer")
    with pytest.raises(ValueError, match="out of range"):
        model.generate([5, VOCAB + 3])
    with pytest.raises(ValueError, match="context"):
        model.generate([5, 6], max_tokens=10**6)
    with pytest.raises(ValueError, match="empty"):
        model.generate([[]])


def test_greedy_token_is_torch_argmax():
    """greedy_token (numpy's argmax on the CPU) picks what torch.argmax picks: the first of equal maxima, the
    first NaN, index 0 of a row of -inf; on rows of a batch's logits (views) too."""
    from gemma4.sampling import greedy_token

    g = torch.Generator().manual_seed(0)
    cases = [torch.randn(262144, generator=g), torch.full((1000,), float("-inf")), torch.zeros(77)]
    tied = torch.randn(5000, generator=g)
    tied[[17, 4000]] = 9.0
    nan = torch.randn(5000, generator=g)
    nan[[300, 20]] = float("nan")
    inf = torch.randn(5000, generator=g)
    inf[[9, 7]] = float("inf")
    batch = torch.randn(8, 3, 4096, generator=g)
    cases += [tied, nan, inf, *batch[:, 1], batch[2, :, ::3]]
    for x in cases:
        assert greedy_token(x) == int(torch.argmax(x))
