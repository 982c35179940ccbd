"""Tiny random Gemma 4 assistants (MTP drafters) built with transformers, beside a tiny target.

transformers 5.23 cannot build a Gemma4AssistantForCausalLM as published: its text config shares the KV
of every layer (num_kv_shared_layers == num_hidden_layers), and Gemma4TextConfig.kv_sharing_modes then
refuses, as no layer is left to produce KV. `_assistant_sharing` gives every layer the "reuse" mode
while the model is built, which is what the assistant's forward expects. A target whose config shares
no KV returns no shared_kv_states either; `mark_shared_kv_producers` sets the "store" flag the
reference gives the last sliding and the last full layer of a KV-sharing model.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from reference import VOCAB, _randomize, build_gemma4

# assistant name -> (target config in reference.GEMMA4_CONFIGS, assistant text config, assistant fields).
# The assistant's attention shapes per layer type follow its target's (its queries read the target's KV).
ASSISTANT_CONFIGS = {
    # K=V target; the assistant's head ordered by centroids (10 clusters of 30 tokens, top 3)
    "ordered": ("moe_kv",
                dict(hidden_size=32, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=16, global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True,
                     sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                                    "full_attention"]),
                dict(use_ordered_embeddings=True, num_centroids=10, centroid_intermediate_top_k=3)),
    # separate K and V on the target's full layers; a plain (full vocabulary) head
    "plain": ("dense_kv_off",
              dict(hidden_size=24, intermediate_size=36, num_attention_heads=2, num_key_value_heads=1,
                   head_dim=12, global_head_dim=24, attention_k_eq_v=False, sliding_window=5,
                   layer_types=["full_attention", "sliding_attention", "full_attention"]),
              dict(use_ordered_embeddings=False)),
}


@contextlib.contextmanager
def _assistant_sharing():
    from transformers import Gemma4TextConfig

    original = Gemma4TextConfig.kv_sharing_modes

    def modes(self):
        if self.num_kv_shared_layers == self.num_hidden_layers:
            return ["reuse"] * self.num_hidden_layers
        return original.fget(self)

    Gemma4TextConfig.kv_sharing_modes = property(modes)
    try:
        yield
    finally:
        Gemma4TextConfig.kv_sharing_modes = original


def mark_shared_kv_producers(target) -> None:
    """Make a transformers Gemma 4 target return shared_kv_states: its last sliding and last full layer
    store their (rotated) K and V there."""
    layers = target.model.layers
    types = target.config.layer_types
    for kind in set(types):
        last = max(i for i, t in enumerate(types) if t == kind)
        layers[last].self_attn.store_full_length_kv = True


def assistant_config(name: str, **fields):
    from transformers import Gemma4AssistantConfig, Gemma4TextConfig

    target_name, text, extra = ASSISTANT_CONFIGS[name]
    from reference import GEMMA4_CONFIGS

    kwargs = dict(vocab_size=VOCAB, num_hidden_layers=len(text["layer_types"]), hidden_size_per_layer_input=0,
                  vocab_size_per_layer_input=0, final_logit_softcapping=30.0, max_position_embeddings=4096,
                  pad_token_id=0, eos_token_id=1, bos_token_id=2)
    kwargs.update(text)
    text_config = Gemma4TextConfig(**kwargs)
    return Gemma4AssistantConfig(text_config=text_config.to_dict(),
                                 backbone_hidden_size=GEMMA4_CONFIGS[target_name]["hidden_size"],
                                 **{**extra, **fields})


def build_assistant(path: Path, name: str, seed: int = 0, **fields):
    """Save a tiny random assistant at `path`; returns the transformers model (float32, eval)."""
    from transformers import Gemma4AssistantForCausalLM

    config = assistant_config(name, **fields)
    with _assistant_sharing():
        model = Gemma4AssistantForCausalLM(config)
    _randomize(model, seed)
    if model.masked_embedding is not None:
        g = torch.Generator().manual_seed(seed + 1000)
        model.masked_embedding.token_ordering.copy_(torch.randperm(VOCAB, generator=g))
    model.save_pretrained(path)
    return model.eval()


def build_pair(tmp: Path, name: str, seed: int = 0, **fields):
    """(target folder, transformers target, assistant folder, transformers assistant)."""
    target_name = ASSISTANT_CONFIGS[name][0]
    target_path, assistant_path = tmp / "target", tmp / "assistant"
    target_path.mkdir(exist_ok=True)
    assistant_path.mkdir(exist_ok=True)
    target = build_gemma4(target_path, target_name, seed=seed)
    mark_shared_kv_producers(target)
    assistant = build_assistant(assistant_path, name, seed=seed + 1, **fields)
    return target_path, target, assistant_path, assistant
