"""Speculative decoding: the same greedy tokens, the same sampling distribution, a cache rolled back
exactly, in the static loop and under continuous batching."""

import re

import pytest
import torch

import gemma4
from gemma4 import speculative as spec
from gemma4.engine import Engine, Request, Sequence, prefill
from gemma4.sampling import SamplingParams, apply_penalties, sample
from gemma4.server.metrics import Metrics
from collect import Collector
from reference import VOCAB, build_gemma4
from paths import BENCH

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def models(gemma4_models):
    return {name: gemma4.load(gemma4_models[name][0]) for name in ("moe_kv", "dense_kv_off")}


@pytest.fixture(scope="module")
def draft(tmp_path_factory):
    """Another random model of the same vocabulary: it agrees with the targets only now and then."""
    path = tmp_path_factory.mktemp("draft")
    build_gemma4(path, "moe_top1", seed=21)
    return gemma4.load(path)


def _repetitive(n_base, repeats, seed):
    base = torch.randint(3, VOCAB, (n_base,), generator=torch.Generator().manual_seed(seed)).tolist()
    return base * repeats


# ---- rollback ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kv_dtype", ["float", "int8"])
def test_truncate_leaves_the_cache_of_a_plain_decode(models, kv_dtype):
    """Garbage drafts written over the ring's wrap and rolled back: the next steps' logits equal those of
    a cache that never saw them (float32; 1e-4 bounds reordering of the same sums, nothing else)."""
    model = models["moe_kv"]
    decoder = model.decoder
    window = model.config.sliding_window
    tokens = _repetitive(5, 8, seed=1)  # crosses the window (8) and wraps the rings several times
    k = 4
    at = 2 * window + 3
    plain = decoder.new_cache(capacity=64, kv_dtype=kv_dtype)
    rolled = decoder.new_cache(capacity=64, tail=k, kv_dtype=kv_dtype)
    for cache in (plain, rolled):
        prefill(decoder, cache, torch.tensor([tokens[:at]]), torch.arange(at)[None])
    garbage = torch.randint(3, VOCAB, (k + 1,), generator=torch.Generator().manual_seed(7)).tolist()
    for accepted in range(k + 1):  # a verify step writes k+1 positions and keeps `accepted` of them
        ids = torch.tensor([tokens[at:at + accepted] + garbage[accepted:]])
        decoder(ids, torch.arange(at, at + k + 1)[None], rolled)
        rolled.truncate(0, at + accepted)
        if accepted:  # the kept tokens alone, plus a padding column (-1: not written) so that, as in the
            # verify chunk, the rings' queries read this chunk's values before int8 rounding
            decoder(torch.tensor([tokens[at:at + accepted] + [0]]),
                    torch.tensor([list(range(at, at + accepted)) + [-1]]), plain)
        at += accepted
        step = (torch.tensor([[tokens[at]]]), torch.tensor([[at]]))
        want = decoder.logits(decoder(*step, plain))
        got = decoder.logits(decoder(*step, rolled))
        assert (got - want).abs().max().item() <= 1e-4, accepted
        at += 1


def test_truncate_refuses_to_roll_a_ring_back_past_its_tail(models):
    decoder = models["moe_kv"].decoder
    window = decoder.config.sliding_window
    cache = decoder.new_cache(capacity=64, tail=1)
    spare = next(layer.capacity for layer in cache.layers if layer.ring) - window  # at least the tail
    n = 3 * (window + spare)
    prefill(decoder, cache, torch.randint(3, VOCAB, (1, n)), torch.arange(n)[None])
    cache.truncate(0, n - spare - 1)  # spare + 1 positions back is still within reach
    with pytest.raises(ValueError, match="tail"):
        cache.truncate(0, n - spare - 3)


# ---- greedy: token-identical ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["moe_kv", "dense_kv_off"])
def test_greedy_prompt_lookup_is_token_identical(models, name):
    model = models[name]
    window = model.config.sliding_window
    prompts = [_repetitive(4, 3, seed=2), _repetitive(7, 2, seed=3)[:11]]
    n = 4 * window  # past the window and round the rings several times
    for k in (1, 3, 6):
        batch = model.generate(prompts, max_tokens=n, speculative=k, **GREEDY)
        for prompt, got in zip(prompts, batch):
            want = model.generate(prompt, max_tokens=n, **GREEDY)
            assert got.token_ids == want.token_ids
        drafted = sum(c.drafted_tokens for c in batch)
        accepted = sum(c.accepted_tokens for c in batch)
        assert 0 < accepted < drafted  # drafts were both kept and rolled back


@pytest.mark.parametrize("name", ["moe_kv", "dense_kv_off"])
def test_greedy_with_a_draft_model_is_token_identical(models, draft, name):
    model = models[name]
    prompt = _repetitive(5, 2, seed=4)
    n = 3 * model.config.sliding_window + 2
    want = model.generate(prompt, max_tokens=n, **GREEDY)
    for drafter_model in (draft, model):  # a stranger (few accepted) and the target itself (all accepted)
        got = model.generate(prompt, max_tokens=n, speculative=4, drafter=spec.DraftModel(drafter_model, model),
                             **GREEDY)
        assert got.token_ids == want.token_ids
        assert got.drafted_tokens > 0
        if drafter_model is model:
            assert got.accepted_tokens == got.drafted_tokens
        else:
            assert got.accepted_tokens < got.drafted_tokens


def test_draft_model_of_another_vocabulary_is_refused(models, tmp_path):
    build_gemma4(tmp_path, "moe_top1", seed=1, vocab_size=VOCAB + 8)
    with pytest.raises(ValueError, match="vocabulary has 308 tokens, the target's 300"):
        spec.DraftModel(gemma4.load(tmp_path), models["moe_kv"])


def test_stop_conditions_cut_accepted_tokens_as_plain_decoding(model_with_tokenizer):
    model = model_with_tokenizer
    prompt = "abcabcabcabcab"
    plain = model.generate(prompt, max_tokens=40, **GREEDY)
    assert len(plain.token_ids) == 40
    stop_id = plain.token_ids[17]
    stop_text = plain.text[20:23]
    cases = [dict(max_tokens=13), dict(max_tokens=40, stop_token_ids=[stop_id]), dict(max_tokens=40, stop=stop_text),
             dict(max_tokens=40, ignore_eos=False)]
    for kw in cases:
        opts = {**GREEDY, **kw}
        want = model.generate(prompt, **opts)
        got = model.generate(prompt, speculative=5, **opts)
        assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, want.finish_reason), kw
        streamed = list(model.generate(prompt, speculative=5, stream=True, **opts))
        assert "".join(s.text for s in streamed) == want.text


def test_embedded_model_with_prompt_lookup_is_token_identical():
    from gemma4.store import embedded_path

    model = gemma4.load(embedded_path())
    paragraph = ("Alice met Bob at the station in Paris. Alice gave Bob a red book, and Bob gave Alice a blue pen. "
                 "Then Alice and Bob took the train to Lyon together.")
    prompt = (f"{paragraph}\n\nThe same paragraph with Alice renamed Carol and Bob renamed Dave:\n\n"
              "Carol met Dave at the station in Paris.")
    want = model.generate(prompt, max_tokens=40, temperature=0)
    got = model.generate(prompt, max_tokens=40, temperature=0, speculative=5)
    assert got.token_ids == want.token_ids
    assert got.accepted_tokens > 10  # the copy pays


# ---- sampling: the same distribution ------------------------------------------------------------
class RandomDrafter:
    """Drafts sampled from a fixed random distribution q per draft index (far from the model's)."""

    def __init__(self, vocab, seed):
        g = torch.Generator().manual_seed(seed)
        self.q = torch.softmax(2.0 * torch.randn(spec.MAX_DRAFT, vocab, generator=g), dim=-1)
        self.generator = torch.Generator().manual_seed(seed + 1)

    def propose(self, ctx, k):
        drafts = [int(torch.multinomial(self.q[i], 1, generator=self.generator)) for i in range(k)]
        return drafts, self.q[:k]


def _chi_square_p(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's goodness of fit; cells expecting fewer than 5 are pooled into one."""
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    df = obs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat.double() / 2))


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab8")
    build_gemma4(path, "dense_kv", seed=4, vocab_size=8)
    return gemma4.load(path)


SAMPLES = 2000
ALPHA = 1e-3  # significance level; the seeds are fixed, so each run draws exactly the same samples


def _second_and_third(model, prompt, params, drafter_factory):
    """Counts [V, V] of (token 2, token 3) over SAMPLES seeded sequences, drafting 2 tokens after the first."""
    vocab = model.config.vocab_size
    counts = torch.zeros(vocab * vocab, dtype=torch.float64)
    for start in range(0, SAMPLES, 1000):
        seqs = [Sequence(prompt, SamplingParams(seed=s, max_tokens=4, ignore_eos=True, **params))
                for s in range(start, start + 1000)]
        _speculative_batch(model.decoder, seqs, 2, drafter_factory())
        for s in seqs:
            counts[s.output_ids[1] * vocab + s.output_ids[2]] += 1
    return counts


@torch.inference_mode()
def _speculative_batch(decoder, seqs, k, drafter):
    """Many sequences of one prompt through the verify rules (speculative.verify) in one batch: a prefill
    of the shared prompt, then verify steps over every running row (the engine runs the same rules one
    request at a time: too slow for thousands of samples)."""
    n = len(seqs[0].prompt_ids)
    cache = decoder.new_cache(batch=len(seqs), capacity=n + 8, tail=k)
    ids = torch.tensor([s.prompt_ids for s in seqs])
    hidden = prefill(decoder, cache, ids, torch.arange(n).expand_as(ids))
    logits = decoder.logits(hidden)
    for b, s in enumerate(seqs):
        s.append(sample(apply_penalties(logits[b], s.output_ids, s.params), s.params, s.generator))
        s.hidden = hidden[b]
    while not all(s.finished for s in seqs):
        plans, qs = [], []
        for b, s in enumerate(seqs):
            if s.finished:
                plans.append(None)
                qs.append(None)
                continue
            tokens = s.prompt_ids + s.output_ids
            want = min(k, s.params.max_tokens - len(s.output_ids) - 1)
            ctx = spec.DraftContext(tokens, len(tokens) - 1, s.hidden, decoder, cache, b, s.params)
            drafts, q = spec.propose(drafter, ctx, want)
            plans.append((tokens[-1], len(tokens) - 1, drafts))
            qs.append(q)
        ids, pos = spec.verify_batch(plans, 0, decoder.device)
        hidden = decoder(ids, pos, cache)
        rows = spec.verify_logits(decoder, hidden, pos)  # one per row (empty for a finished one)
        for b, (s, plan, q) in enumerate(zip(seqs, plans, qs)):
            if plan is None:
                continue
            _, position, drafts = plan
            new = spec.verify.accept(rows[b], drafts, q, s.params, s.output_ids, s.generator)
            for token in new:
                s.append(token)
                if s.finished:
                    break
            if len(new) <= len(drafts):
                cache.truncate(b, position + len(new))
            s.hidden = hidden[b, len(new) - 1]


def _exact_second_and_third(model, prompt, params):
    """P(token 2, token 3) under plain sampling, summed over token 1, from teacher-forced logits."""
    vocab = model.config.vocab_size
    pairs = [prompt + [a, b] for a in range(vocab) for b in range(vocab)]
    logits = model.forward(pairs)  # [V*V, T, V]
    n = len(prompt)
    sp = SamplingParams(**params)
    dist = lambda row: spec.verify.distribution(row, sp)  # noqa: E731
    p1 = dist(logits[0, n - 1])
    joint = torch.zeros(vocab, vocab, dtype=torch.float64)
    for i, (a, b) in enumerate((a, b) for a in range(vocab) for b in range(vocab)):
        joint[a, b] = p1[a] * dist(logits[i, n])[b]
    # P(t2 = b, t3 = c) = sum_a P(a) P(b | a) P(c | a, b)
    third = torch.stack([dist(logits[i, n + 1]) for i in range(len(pairs))]).double().view(vocab, vocab, vocab)
    exact = (joint[:, :, None] * third).sum(0).flatten()
    return exact


@pytest.mark.parametrize("drafter, params", [
    ("random_q", dict(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05)),  # q from the drafter, p filtered
    ("prompt_lookup", dict(temperature=1.0, top_k=0, top_p=1.0)),  # one-hot q
])
def test_sampled_tokens_follow_the_models_distribution(small_vocab, params, drafter):
    model = small_vocab
    prompt = [2, 5, 3, 7, 5, 3]
    factory = (lambda: RandomDrafter(8, seed=3)) if drafter == "random_q" else spec.PromptLookup
    counts = _second_and_third(model, prompt, params, factory)
    exact = _exact_second_and_third(model, prompt, params)
    p = _chi_square_p(counts, exact * SAMPLES)
    print(f"chi-square p-value {p:.3g} ({drafter}, {params})")
    assert p > ALPHA


def test_the_distribution_test_catches_a_wrong_rule(small_vocab, monkeypatch):
    """The same test on a rule that keeps every draft: its samples follow q, and the test rejects them."""
    params = dict(temperature=1.0, top_k=0, top_p=1.0)

    def keep_all(logits, drafts, q, params, output_ids, generator):
        return list(drafts) + [int(torch.multinomial(spec.verify.distribution(logits[len(drafts)], params), 1,
                                                     generator=generator))]

    monkeypatch.setattr(spec.verify, "accept", keep_all)
    prompt = [2, 5, 3, 7, 5, 3]
    counts = _second_and_third(small_vocab, prompt, params, lambda: RandomDrafter(8, seed=3))
    assert _chi_square_p(counts, _exact_second_and_third(small_vocab, prompt, params) * SAMPLES) < ALPHA


def test_seeded_speculative_sampling_is_reproducible(models):
    model = models["moe_kv"]
    prompt = _repetitive(4, 3, seed=5)
    opts = dict(max_tokens=30, temperature=0.8, top_k=0, top_p=1.0, ignore_eos=True, speculative=4)
    a = model.generate(prompt, seed=1, **opts)
    b = model.generate(prompt, seed=1, **opts)
    c = model.generate(prompt, seed=2, **opts)
    assert a.token_ids == b.token_ids != c.token_ids
    assert a.drafted_tokens > 0


# ---- adaptive K ---------------------------------------------------------------------------------
def test_k_adapts_down_on_rejections_and_back_up():
    k = spec.AdaptiveK(6)
    for proposed, accepted, want in [(6, 2, 5), (5, 0, 4), (4, 1, 3), (3, 0, 2), (2, 0, 1), (1, 0, 1), (0, 0, 1),
                                     (1, 1, 3), (3, 3, 5), (5, 5, 6)]:
        k.update(proposed, accepted)
        assert k.k == want


class WrongDrafter:
    """Always drafts a token the greedy target never picks next (it records what it was asked for)."""

    def __init__(self):
        self.asked = []

    def propose(self, ctx, k):
        self.asked.append(k)
        return [(ctx.tokens[-1] + 1) % VOCAB] * k, None


def test_low_acceptance_drafts_fewer_tokens(models):
    model = models["moe_kv"]
    drafter = WrongDrafter()
    prompt = _repetitive(4, 3, seed=2)
    want = model.generate(prompt, max_tokens=20, **GREEDY)
    got = model.generate(prompt, max_tokens=20, speculative=5, drafter=drafter, **GREEDY)
    assert got.token_ids == want.token_ids
    assert drafter.asked[:5] == [5, 4, 3, 2, 1]


# ---- continuous batching ------------------------------------------------------------------------
def _scheduled(model, jobs, **kw):
    sched = Engine(model, max_batch=2, prefill_chunk=4, **kw).start()
    try:
        collectors = []
        for prompt, params in jobs:
            c = Collector()
            sched.submit(Request(prompt, params, c))
            collectors.append(c)
        for c in collectors:
            assert c.done.wait(120)
    finally:
        sched.stop()
    return sched, collectors


def test_scheduler_speculation_equals_the_static_path(models):
    model = models["moe_kv"]
    window = model.config.sliding_window
    jobs = [(_repetitive(4, 3, seed=2), SamplingParams(max_tokens=3 * window, **GREEDY)),
            (_repetitive(5, 2, seed=6), SamplingParams(max_tokens=2 * window + 3, temperature=0.9, top_k=0,
                                                       top_p=1.0, seed=4, ignore_eos=True)),
            (_repetitive(3, 4, seed=8), SamplingParams(max_tokens=window, **GREEDY))]
    sched, collectors = _scheduled(model, jobs, speculative=4, drafter=spec.PromptLookup())
    for (prompt, params), c in zip(jobs, collectors):
        p = params
        alone = model.generate(prompt, max_tokens=p.max_tokens, temperature=p.temperature, top_k=p.top_k,
                               top_p=p.top_p, seed=p.seed, ignore_eos=True, speculative=4)
        assert c.token_ids == alone.token_ids
        assert c.outputs[-1].completion_tokens == p.max_tokens
    greedy_plain = model.generate(jobs[0][0], max_tokens=3 * window, **GREEDY)
    assert collectors[0].token_ids == greedy_plain.token_ids
    stats = sched.stats
    assert 0 < stats.accepted_tokens < stats.draft_tokens

    text = Metrics(sched).render().decode()
    drafted = float(re.search(r"^gemma4_speculative_draft_tokens_total (\S+)$", text, re.M).group(1))
    accepted = float(re.search(r"^gemma4_speculative_accepted_tokens_total (\S+)$", text, re.M).group(1))
    assert (drafted, accepted) == (stats.draft_tokens, stats.accepted_tokens)


def test_scheduler_does_not_speculate_under_a_grammar(models):
    class Anything:  # a constraint that allows every token
        done = False

        def mask_logits(self, logits):
            return logits

        def accept(self, token):
            pass

    model = models["moe_kv"]
    sched = Engine(model, max_batch=1, speculative=4, drafter=spec.PromptLookup()).start()
    try:
        c = Collector()
        sched.submit(Request(_repetitive(4, 3, seed=2), SamplingParams(max_tokens=12, **GREEDY), c,
                             constraint=Anything()))
        assert c.done.wait(60)
    finally:
        sched.stop()
    assert sched.stats.draft_tokens == 0
    assert c.token_ids == model.generate(_repetitive(4, 3, seed=2), max_tokens=12, **GREEDY).token_ids


# ---- command line -------------------------------------------------------------------------------
def test_cli_speculative_run_prints_the_plain_completion(tiny_gguf):
    from commands import cli

    prompt = "the cat the cat the cat"
    expected = gemma4.load(tiny_gguf).generate(prompt, max_tokens=16, temperature=0)
    for extra in (["--speculative", "4"], ["--speculative", "3", "--draft-model", str(tiny_gguf)]):
        r = cli("run", "-m", str(tiny_gguf), "--temperature", "0", "-n", "16", *extra, prompt)
        assert r.returncode == 0, r.stderr
        assert r.stdout == prompt + expected.text + "\n"


@pytest.mark.parametrize("args, says", [(["--draft-model", "x.gguf"], "--draft-model needs --speculative"),
                                        (["--speculative", "99"], "--speculative: ")])
def test_cli_refuses_bad_speculative_options(tiny_gguf, args, says):
    from commands import cli

    r = cli("run", "-m", str(tiny_gguf), *args, "hello")
    assert r.returncode == 2
    assert says in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ---- the embedded model: a verify row is a decode row, bit for bit ------------------------------------
@pytest.fixture(scope="module")
def embedded():
    from gemma4 import store

    return gemma4.load(store.embedded_path())


def test_a_verify_row_gives_a_decode_rows_bits(embedded):
    """K + 1 positions through one forward (a verify step) against one decode step per position: the
    same layer outputs and logits, bit for bit (the ring is read as a decode step reads it, the products
    sum each row alike whatever the rows beside it)."""
    dec = embedded.decoder
    text = (BENCH / "data" / "english.txt").read_text()
    ids = embedded.tokenizer.encode(text * 2)[:700]  # past the window: the rings have wrapped
    n, k = 690, 6
    with torch.inference_mode():
        stepped = dec.new_cache(batch=1, capacity=n + 8, tail=k)
        prefill(dec, stepped, torch.tensor([ids[:n]]), torch.arange(n)[None])
        one = [dec.logits(dec(torch.tensor([[ids[n + j]]]), torch.tensor([[n + j]]), stepped)[:, -1])[0]
               for j in range(k + 1)]
        verified = dec.new_cache(batch=1, capacity=n + 8, tail=k)
        prefill(dec, verified, torch.tensor([ids[:n]]), torch.arange(n)[None])
        pos = torch.arange(n, n + k + 1)[None]
        rows = spec.verify_logits(dec, dec(torch.tensor([ids[n:n + k + 1]]), pos, verified), pos)[0]
    assert all(torch.equal(rows[j], one[j]) for j in range(k + 1))


@pytest.mark.parametrize("case", ["copy", "repeat"])
def test_greedy_speculation_on_the_embedded_model_is_token_identical(embedded, case):
    """The cases that departed from plain greedy (at tokens 9 and 31 on two CPUs): a verify step read the
    rings as a prefill chunk does, and rings of another size (plain runs have no tail) ordered their
    chunks otherwise."""
    doc = (BENCH / "data" / "english.txt").read_text()[:3000]
    prompt, k = {"copy": (doc + "\n\nRepeat the text above word for word:\n\n", 5),
                 "repeat": ("The quick brown fox jumps over the lazy dog. " * 20, 4)}[case]
    plain = embedded.generate(prompt, max_tokens=120, temperature=0)
    fast = embedded.generate(prompt, max_tokens=120, temperature=0, speculative=k)
    assert fast.token_ids == plain.token_ids
