"""Continuous batching: sequences that join, leave and share the batch give what they give alone."""

import pytest
import torch

import gemma4
from gemma4.sampling import SamplingParams
from gemma4.engine import QueueFull, Request, Engine
from collect import Collector
from reference import VOCAB


@pytest.fixture(scope="module")
def model(gemma4_models):
    path, _ = gemma4_models["moe_kv"]
    return gemma4.load(path)


def _prompt(n, seed):
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_requests_joining_a_running_batch_match_greedy_alone(model):
    window = model.config.sliding_window
    # Prompts that cross the window; max_tokens that make the ring wrap; one prompt longer than a chunk.
    jobs = [(_prompt(3, 1), 3 * window), (_prompt(2 * window + 1, 2), window), (_prompt(7, 3), 2 * window + 5),
            (_prompt(1, 4), 4)]
    sched = Engine(model, max_batch=2, prefill_chunk=4).start()  # fewer rows than jobs: rows are reused
    try:
        collectors = []
        for i, (prompt, n) in enumerate(jobs):
            c = Collector()
            sched.submit(Request(prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), c))
            collectors.append(c)
            if i == 0:  # the others join while the first is decoding
                while len(c.outputs) < 2:
                    c.done.wait(0.01)
        for c in collectors:
            assert c.done.wait(120)
    finally:
        sched.stop()
    for (prompt, n), c in zip(jobs, collectors):
        alone = model.generate(prompt, max_tokens=n, temperature=0, ignore_eos=True)
        assert c.token_ids == alone.token_ids
        assert c.outputs[-1].finish_reason == "length" and c.outputs[-1].completion_tokens == n


def test_seeded_sampling_is_per_sequence(model):
    params = dict(max_tokens=12, temperature=1.0, top_k=0, top_p=1.0, ignore_eos=True)
    sched = Engine(model, max_batch=4).start()
    try:
        cs = [Collector() for _ in range(3)]
        for c, seed in zip(cs, (5, 6, 5)):
            sched.submit(Request(_prompt(5, 9), SamplingParams(seed=seed, **params), c))
        for c in cs:
            assert c.done.wait(60)
    finally:
        sched.stop()
    alone = model.generate(_prompt(5, 9), seed=5, **params)
    assert cs[0].token_ids == cs[2].token_ids == alone.token_ids
    assert cs[1].token_ids != cs[0].token_ids


def test_cancel_frees_the_row_and_a_full_queue_refuses(model):
    sched = Engine(model, max_batch=1, max_queue=1)
    long = Collector()
    first = Request(_prompt(4, 1), SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True), long)
    sched.submit(first)
    waiting = Request(_prompt(4, 2), SamplingParams(max_tokens=3, temperature=0), Collector())
    with pytest.raises(QueueFull):  # the first still waits (the thread is not started): the queue is full
        sched.submit(waiting)
    sched.start()
    try:
        while len(long.outputs) < 3:
            long.done.wait(0.01)
        sched.submit(waiting)  # no free row until the first is cancelled
        sched.cancel(first)
        assert waiting.emit.done.wait(60)
        assert waiting.emit.token_ids == model.generate(waiting.prompt_ids, max_tokens=3, temperature=0).token_ids
        assert not long.done.is_set() and sched.running == 0
    finally:
        sched.stop()


def test_logprobs_and_penalties(model):
    prompt = _prompt(6, 3)
    c = Collector()
    sched = Engine(model).start()
    try:
        sched.submit(Request(prompt, SamplingParams(max_tokens=1, temperature=0), c, logprobs=3))
        pen = Collector()
        sched.submit(Request(prompt, SamplingParams(max_tokens=20, temperature=0, frequency_penalty=2.0,
                                                    ignore_eos=True), pen))
        assert c.done.wait(60) and pen.done.wait(60)
    finally:
        sched.stop()
    logp = torch.log_softmax(model.forward(prompt)[-1], dim=-1)
    lp = c.outputs[0].logprob
    best = torch.topk(logp, 3)
    assert lp.token_id == int(best.indices[0]) and abs(lp.logprob - float(best.values[0])) < 1e-5
    assert [t for t, _ in lp.top] == best.indices.tolist()
    plain = model.generate(prompt, max_tokens=20, temperature=0, ignore_eos=True).token_ids
    # A random model repeats itself greedily; a strong frequency penalty makes repeats rarer.
    assert len(set(pen.token_ids)) > len(set(plain))


def test_rows_decode_in_row_order(model):
    """A request that takes a freed row decodes in that row's place, so consecutive rows are one slice of the
    cache (views, not copies); its tokens are still its tokens alone."""
    eng = Engine(model, max_batch=3)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    first = [Request(_prompt(3, s), params) for s in range(3)]
    for r in first:
        eng.submit(r)
    while len(eng.scheduler.decoding()) < 3:
        eng.step()
    late = Request(_prompt(5, 7), SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), Collector())
    eng.cancel(first[0])
    eng.submit(late)
    seen = 0
    while not late.emit.done.is_set():
        eng.step()
        decoding = eng.scheduler.decoding()
        if len(decoding) == 3:
            assert [r.row for r in decoding] == [0, 1, 2] and decoding[0].request is late
            seen += 1
    assert seen
    assert late.emit.token_ids == model.generate(late.prompt_ids, max_tokens=6, temperature=0,
                                                 ignore_eos=True).token_ids
