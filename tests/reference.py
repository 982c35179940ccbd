"""Tiny random Gemma models built with transformers (the reference), saved as HF checkpoints.

Weights are re-drawn with unit-scale variance (transformers' 0.02 init gives near-zero logits that
would hide errors), norm weights and router scales away from 1, layer scalars away from 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 300

# Five configurations: MoE and dense, K=V on and off, top-k 1 and > 1, odd sizes, and a sliding window
# far smaller than the test prompts so it is crossed several times.
GEMMA4_CONFIGS = {
    "moe_kv": dict(hidden_size=48, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=16, global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True,
                   sliding_window=8, layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                                  "sliding_attention", "full_attention"],
                   enable_moe_block=True, num_experts=5, top_k_experts=2, moe_intermediate_size=24),
    "dense_kv_off": dict(hidden_size=40, intermediate_size=56, num_attention_heads=4, num_key_value_heads=1,
                         head_dim=12, global_head_dim=24, attention_k_eq_v=False, sliding_window=5,
                         layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"]),
    "moe_top1": dict(hidden_size=36, intermediate_size=28, num_attention_heads=6, num_key_value_heads=3,
                     head_dim=10, global_head_dim=20, num_global_key_value_heads=2, attention_k_eq_v=False,
                     sliding_window=6, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                     enable_moe_block=True, num_experts=7, top_k_experts=1, moe_intermediate_size=12),
    # every matrix row a whole number of 32-element blocks, KV heads the same on all layers
    "blocks": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=32, global_head_dim=64, num_global_key_value_heads=2, attention_k_eq_v=True,
                   sliding_window=6, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                   enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32),
    "dense_kv": dict(hidden_size=44, intermediate_size=36, num_attention_heads=6, num_key_value_heads=3,
                     head_dim=12, global_head_dim=28, num_global_key_value_heads=2, attention_k_eq_v=True,
                     sliding_window=7, layer_types=["sliding_attention"] * 5 + ["full_attention"]),
}


# E2B/E4B-shaped: per-layer embeddings (PLE), with and without KV-shared layers, the double-wide MLP of
# shared layers, K=V on a shared source; odd sizes and windows far smaller than the test prompts.
PLE_CONFIGS = {
    "ple_shared": dict(hidden_size=40, intermediate_size=28, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=12, global_head_dim=20, attention_k_eq_v=False, sliding_window=5,
                       hidden_size_per_layer_input=6, num_kv_shared_layers=3, use_double_wide_mlp=True,
                       layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention",
                                    "full_attention", "sliding_attention", "full_attention"]),
    "ple_plain": dict(hidden_size=36, intermediate_size=44, num_attention_heads=3, num_key_value_heads=1,
                      head_dim=14, global_head_dim=18, attention_k_eq_v=False, sliding_window=6,
                      hidden_size_per_layer_input=10,
                      layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention",
                                   "full_attention"]),
    "ple_shared_keqv": dict(hidden_size=32, intermediate_size=24, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=8, global_head_dim=16, num_global_key_value_heads=1, attention_k_eq_v=True,
                            sliding_window=7, hidden_size_per_layer_input=4, num_kv_shared_layers=2,
                            layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                         "sliding_attention", "full_attention"]),
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("router.scale"):
                p.copy_(0.6 + 0.8 * torch.rand(p.shape, generator=g))
            elif name.endswith("per_expert_scale"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif p.dim() >= 2:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))


def gemma4_text_config(name: str, **overrides):
    from transformers import Gemma4TextConfig

    shape = GEMMA4_CONFIGS.get(name) or PLE_CONFIGS[name]
    kwargs = dict(vocab_size=VOCAB, num_hidden_layers=len(shape["layer_types"]), hidden_size_per_layer_input=0,
                  vocab_size_per_layer_input=VOCAB, final_logit_softcapping=30.0, max_position_embeddings=4096,
                  pad_token_id=0, eos_token_id=1, bos_token_id=2)
    kwargs.update(shape)
    kwargs.update(overrides)
    return Gemma4TextConfig(**kwargs)


def build_gemma4(path: Path, name: str, seed: int = 0, multimodal: bool = False, shard: str | None = None,
                 **overrides):
    """Save a tiny random Gemma 4 at `path`; returns the transformers model (float32, eval)."""
    from transformers import Gemma4Config, Gemma4ForCausalLM, Gemma4ForConditionalGeneration

    text = gemma4_text_config(name, **overrides)
    if multimodal:
        model = Gemma4ForConditionalGeneration(Gemma4Config(text_config=text.to_dict()))
    else:
        model = Gemma4ForCausalLM(text)
    _randomize(model, seed)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kwargs)
    return model.eval()


def write_byte_tokenizer(path: Path) -> None:
    """A byte-level BPE tokenizer.json with <pad>=0, <eos>=1, <bos>=2 and the 256 bytes (ids 3..258)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<pad>", "<eos>", "<bos>"])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "add_bos_token": True}))


GEMMA3_CONFIGS = {
    "g3_linear_rope": dict(hidden_size=40, intermediate_size=52, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=12, query_pre_attn_scalar=12, sliding_window=6, num_hidden_layers=7,
                           rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                               "rope_theta": 1_000_000.0},
                                            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}),
    # attn_logit_softcapping is in Gemma 3's config but the reference does not apply it
    "g3_softcap": dict(hidden_size=32, intermediate_size=40, num_attention_heads=2, num_key_value_heads=1,
                       head_dim=16, query_pre_attn_scalar=24, sliding_window=5, num_hidden_layers=6,
                       attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
}


def build_gemma3(path: Path, name: str, seed: int = 0):
    """Save a tiny random Gemma 3 text model at `path`; returns the transformers model."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    kwargs = dict(vocab_size=VOCAB, max_position_embeddings=4096, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    kwargs.update(GEMMA3_CONFIGS[name])
    model = Gemma3ForCausalLM(Gemma3TextConfig(**kwargs))
    _randomize(model, seed)
    with torch.no_grad():  # Gemma 3 norms multiply by (1 + w): centre w on 0
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.sub_(1.0)
    model.save_pretrained(path)
    return model.eval()


def tiny_vocab_metadata(size: int = VOCAB) -> dict:
    """SentencePiece-style GGUF tokenizer metadata (llama.cpp's `llama` tokenizer model) of `size` tokens:
    <pad> <eos> <bos> <unk> <start_of_turn> <end_of_turn>, the 256 byte tokens, then word pieces."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    types = [3, 3, 3, 2, 3, 3]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    pieces = ["▁", "▁the", "▁a", "e", "t", "o", "▁is", "▁of", "in", "an", "er", "▁and", "s", "▁to", "re", "on"]
    words = iter("▁" + a + b for a in "bcdfghklmnprstvw" for b in "aeiou")
    while len(tokens) < size:
        tokens.append(pieces.pop(0) if pieces else next(words))
        types.append(1)
    scores = [0.0] * 6 + [0.0] * 256 + [-float(i) for i in range(len(tokens) - 262)]
    return {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens[:size], "tokenizer.ggml.scores": scores[:size],
        "tokenizer.ggml.token_type": types[:size], "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.unknown_token_id": 3,
        "tokenizer.ggml.padding_token_id": 0, "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False, "tokenizer.ggml.add_space_prefix": False,
    }


GEMMA4_SPECIAL_TOKENS = ["<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>",
                         "<|tool_response>", "<tool_response|>", "<|tool>", "<tool|>", '<|"|>', "<|think|>"]


def gemma4_vocab_metadata(size: int = VOCAB) -> dict:
    """tiny_vocab_metadata with the Gemma 4 chat tokens (control tokens) in place of its last word pieces."""
    meta = tiny_vocab_metadata(size)
    n = len(GEMMA4_SPECIAL_TOKENS)
    meta["tokenizer.ggml.tokens"] = meta["tokenizer.ggml.tokens"][:size - n] + GEMMA4_SPECIAL_TOKENS
    meta["tokenizer.ggml.token_type"] = meta["tokenizer.ggml.token_type"][:size - n] + [3] * n
    return meta


def mean_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean over positions of KL(p || q) between two logits tensors [..., vocab], in float64."""
    p, q = torch.log_softmax(p_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
    return (p.exp() * (p - q)).sum(-1).mean().item()
