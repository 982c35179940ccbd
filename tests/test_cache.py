"""Prefill + cached decode steps equal one full forward, across the window and after the ring wraps."""

import pytest
import torch

import gemma4
from gemma4.engine import prefill
from reference import VOCAB


@pytest.mark.parametrize("name", ["moe_kv", "dense_kv_off", "dense_kv"])
@pytest.mark.parametrize("prompt_len", [1, 5, 13])
def test_decode_steps_match_full_forward(gemma4_models, name, prompt_len):
    path, _ = gemma4_models[name]
    model = gemma4.load(path)
    window = model.config.sliding_window
    total = 4 * window + 3  # the ring wraps several times
    ids = torch.randint(3, VOCAB, (total,), generator=torch.Generator().manual_seed(7))
    full = model.forward(ids)

    dec = model.decoder
    cache = dec.new_cache(batch=1, capacity=4)  # small, so full layers must grow
    pos = torch.arange(total)[None]
    h = prefill(dec, cache, ids[None, :prompt_len], pos[:, :prompt_len], chunk=4)
    steps = [dec.logits(h)[0]]
    for t in range(prompt_len, total):
        with torch.inference_mode():
            h = dec(ids[None, t:t + 1], pos[:, t:t + 1], cache)[:, -1]
        steps.append(dec.logits(h)[0])
    stepped = torch.stack(steps)
    assert (stepped - full[prompt_len - 1:]).abs().max().item() <= 1e-4


def test_cache_memory_is_bounded(gemma4_models):
    path, _ = gemma4_models["moe_kv"]
    model = gemma4.load(path)
    cfg = model.config
    ids = torch.randint(3, VOCAB, (50,), generator=torch.Generator().manual_seed(1))
    cache = model.decoder.new_cache(batch=1, capacity=50)
    prefill(model.decoder, cache, ids[None], torch.arange(50)[None])
    for i, layer in enumerate(cache.layers):
        if cfg.is_sliding(i):
            assert layer.v.shape[2] == cfg.sliding_window and layer.k.shape[2] == cfg.sliding_window
        else:
            assert layer.k is None, "a K=V layer stores one tensor"
            assert layer.v.shape[2] >= 50
