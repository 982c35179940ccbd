"""The E2B shape bench/prepare.py makes (--shape e2b), in tiny widths: a valid Gemma 4 with per-layer embeddings and
KV-shared layers, whose GGUF drafts for the 26B-A4B shape's GGUF as `--draft-model` does (the same vocabulary);
and the speed-up arithmetic of bench/speculative_draft.py. No timing is asserted."""

import sys

import pytest
import torch

import gemma4
from paths import BENCH

sys.path.insert(0, str(BENCH))

import prepare  # noqa: E402
import random_model  # noqa: E402
import speculative_draft  # noqa: E402

LAYERS = 7  # 4 sliding + 1 full, then 2 KV-shared (one of each kind) with the double-wide MLP


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    cache = tmp_path_factory.mktemp("bench-cache")
    e2b = prepare.shape_model(LAYERS, formats=("Q8_0",), tiny=True, cache=cache, shape="e2b")
    moe = prepare.shape_model(2, formats=("Q8_0",), tiny=True, cache=cache)
    return e2b, moe


def test_real_e2b_numbers():
    config = random_model.hf_config(35, 262144, shape="e2b")
    assert config["layer_types"].count("full_attention") == 7 and config["layer_types"][4::5] == ["full_attention"] * 7
    assert config["num_kv_shared_layers"] == 20 and config["vocab_size_per_layer_input"] == 262144
    from gemma4.config import ModelConfig

    cfg = ModelConfig.from_hf(config)
    # 15 layers hold KV; the shared ones read layer 13 (sliding) or 14 (full), as published E2B configs say
    assert [cfg.kv_source_layer(i) for i in (15, 19, 34)] == [13, 14, 14]
    assert cfg.intermediate_size_of(14) == 6144 and cfg.intermediate_size_of(15) == 12288


def test_prepared_e2b_is_what_transformers_expects(shapes, float_products):
    from transformers import Gemma4ForCausalLM

    e2b, _ = shapes
    ref, info = Gemma4ForCausalLM.from_pretrained(e2b.hf, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ours = gemma4.load(e2b.hf, progress=False)
    cfg = ours.config
    assert cfg.hidden_size_per_layer_input > 0 and cfg.num_kv_shared_layers == 2 and cfg.use_double_wide_mlp
    assert ref.config.num_kv_shared_layers == 2
    ids = torch.tensor(ours.tokenizer.encode((BENCH / "data" / "english.txt").read_text())[:48])
    with torch.no_grad():
        theirs = ref(ids[None]).logits[0]
    logits = ours.forward(ids)
    assert logits.std() > 0.1  # random weights scaled so activations neither vanish nor blow up
    assert (logits - theirs).abs().max().item() <= 1e-4  # same bf16 weights, both in float32 (as test_decoder_parity)
    assert gemma4.load(e2b.gguf["Q8_0"], progress=False).config.num_kv_shared_layers == 2


def test_e2b_gguf_drafts_for_the_26b_shape_gguf(shapes):
    from gemma4.speculative import drafter_for

    e2b, moe = shapes
    target = gemma4.load(moe.gguf["Q8_0"], progress=False)
    drafter = drafter_for(e2b.gguf["Q8_0"], target)  # what --draft-model makes: the vocabulary checked
    ids = target.tokenizer.encode("Sofia Lopez opened the bakery")
    want = target.generate(ids, max_tokens=20, temperature=0, ignore_eos=True)
    got = target.generate(ids, max_tokens=20, temperature=0, ignore_eos=True, speculative=4, drafter=drafter)
    assert got.token_ids == want.token_ids and got.drafted_tokens > 0


def test_speed_up_arithmetic():
    for a in (0.0, 0.5, 0.9):
        for k in (1, 3, 8):
            # a round yields the target's token plus drafts 1..j accepted with probability a^j
            assert speculative_draft.tokens_per_round(a, k) == pytest.approx(sum(a ** j for j in range(k + 1)))
    assert speculative_draft.tokens_per_round(1.0, 5) == 6
    # drafting for free with a verify step as cheap as a decode step: the speed-up is the tokens per round
    assert speculative_draft.speed_up(0.8, 4, draft=0.0, verify=1.0, step=1.0) == pytest.approx(
        speculative_draft.tokens_per_round(0.8, 4))
    # a round costing 3 decode steps breaks even where it yields 3 tokens
    a = speculative_draft._break_even(3, draft=1.0, verify=2.0, step=1.0)
    assert speculative_draft.tokens_per_round(a, 3) == pytest.approx(3.0, abs=1e-9)
    assert speculative_draft._break_even(3, draft=3.0, verify=2.0, step=1.0) is None  # 5 steps for at most 4 tokens
