"""Gemma 3 (query_pre_attn_scalar, linear RoPE scaling on global layers, (1 + w) norms, attention
softcap) against transformers' Gemma3ForCausalLM, float32; the bound is the one argued in
test_decoder_parity.py."""

import pytest
import torch

import gemma4
from reference import GEMMA3_CONFIGS, VOCAB, build_gemma3


@pytest.mark.parametrize("name", list(GEMMA3_CONFIGS))
def test_gemma3_matches_reference(tmp_path, name):
    ref = build_gemma3(tmp_path, name, seed=4)
    model = gemma4.load(tmp_path)
    assert model.config.architecture == "gemma3"
    ids = torch.randint(3, VOCAB, (40,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(ids[None]).logits[0]
    diff = (model.forward(ids, chunk=9) - expected).abs().max().item()
    print(f"{name}: max |diff| {diff:.2e}")
    assert diff <= 1e-4
    with torch.no_grad():
        out = ref.generate(ids[None, :8], max_new_tokens=32, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, 8:].tolist()
    assert model.generate(ids[:8].tolist(), max_tokens=32, temperature=0, ignore_eos=True).token_ids == out
