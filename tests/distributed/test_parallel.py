"""A tiny random Gemma 4 MoE (transformers' model, K=V global layers with one KV head, a sliding window of 8
crossed several times) split over 2 ranks on this machine (gloo), against the same model in one process.

Each split rank computes part of each sum (heads, MLP columns, experts) and the ranks add the parts: the same
float32 sums in another order, so logits of order 10 differ by rounding (~1e-6); 1e-4 bounds that with room
and is far below any real error (a wrong head, expert or KV slot moves logits by order 1).
"""

import pytest
import torch

import gemma4
from collect import Collector
from gemma4.engine import Engine, Request
from gemma4.kv import PrefixStore
from gemma4.sampling import SamplingParams
from gemma4.speculative import PromptLookup
from reference import VOCAB, build_gemma4

SPLITS = {"tensor": dict(tensor_parallel=2), "experts": dict(expert_parallel=2)}
TOLERANCE = 1e-4


def _ids(n, seed):
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("moe_kv")
    build_gemma4(path, "moe_kv", seed=4)
    return path


@pytest.fixture(scope="module")
def one(tiny):
    return gemma4.load(tiny, progress=False)


def _engine(model):
    """Prefill chunks of 8 and a prefix store that keeps prompts of a block of 4 or more: reuse on short prompts."""
    return Engine(model, max_batch=2, max_queue=4, prefill_chunk=8, ring_tail=4,
                  prefix_store=PrefixStore(10**8, block_tokens=4, min_tokens=1), speculative=3, drafter=PromptLookup())


def _run(engine, prompt, n, speculative=0):
    c = Collector()
    engine.submit(Request(prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), c,
                          speculative=speculative))
    while engine.step():
        pass
    assert c.done.is_set()
    return c


@pytest.mark.parametrize("split", SPLITS)
def test_a_split_model_gives_one_process_logits_and_tokens(tiny, one, split, float_products):
    model = gemma4.load(tiny, progress=False, **SPLITS[split])
    try:
        ids = _ids(40, 1)  # 5 windows
        diff = (model.forward(ids) - one.forward(ids)).abs().max().item()
        assert diff < TOLERANCE

        prompt = _ids(12, 2)
        assert model.generate(prompt, max_tokens=30, temperature=0, ignore_eos=True).token_ids == \
            one.generate(prompt, max_tokens=30, temperature=0, ignore_eos=True).token_ids

        # the engine's other KV paths: a prefix stored and resumed (a second prompt on the same document), and
        # speculative decoding on a repetitive prompt (verify steps over drafts, rollback of rejected ones)
        doc, repeat = _ids(20, 3), _ids(6, 5) * 4
        split_engine, one_engine = _engine(model), _engine(one)
        for prompt, spec in ((doc + _ids(3, 6), 0), (doc + _ids(5, 7), 0), (repeat, 3)):
            got, want = _run(split_engine, prompt, 16, spec), _run(one_engine, prompt, 16, spec)
            assert got.token_ids == want.token_ids
            assert got.outputs[-1].cached_tokens == want.outputs[-1].cached_tokens
        assert split_engine.stats.prefix_hits == one_engine.stats.prefix_hits > 0
        assert split_engine.stats.draft_tokens > 0
    finally:
        model.decoder.close()


@pytest.mark.parametrize("split", SPLITS)
def test_a_split_quantised_model_keeps_the_native_kernels_tokens(tmp_path, split, monkeypatch):
    """Weights quantised at load (int8): the experts of an expert-parallel rank run through the native expert
    kernels (the fused layer kept), a tensor-parallel rank's matrices through the native products; greedy tokens
    are one process's. A split changes only the order of sums, but int8 activations are rounded per block of 32
    values, and a last-bit change can move a value across a rounding boundary: so the logits are bounded by the
    int8 path's own distance from exact (float-activation) products, not by float rounding. Prompts stay under
    the matrix engine's 24 rows (from there a tensor-parallel prefill takes the engine's bf16 products, where
    one process's fused layer keeps the int8 kernels: the fused layer is not used under tensor parallelism)."""
    from gemma4.native import ops

    build_gemma4(tmp_path, "blocks", seed=5)
    one = gemma4.load(tmp_path, progress=False, quantize="int8")
    model = gemma4.load(tmp_path, progress=False, quantize="int8", **SPLITS[split])
    try:
        ids = _ids(20, 8)  # windows of 6: crossed three times
        want = one.forward(ids)
        with monkeypatch.context() as m:
            m.setattr(ops, "_activations", "float")
            exact = one.forward(ids)
        assert (model.forward(ids) - want).abs().max() <= (want - exact).abs().max()
        prompt = _ids(10, 9)
        assert model.generate(prompt, max_tokens=20, temperature=0, ignore_eos=True).token_ids == \
            one.generate(prompt, max_tokens=20, temperature=0, ignore_eos=True).token_ids
    finally:
        model.decoder.close()
