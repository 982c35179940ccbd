"""The Gemma 4 assistant as a drafter for speculative decoding (the Drafter interface of speculative.py).

What it reads from the target, per round (nothing is copied or kept between rounds):
- the target's embedding row of the last token (scaled by sqrt(target hidden), as the target embeds);
- the target's final-normed hidden state that produced that token (DraftContext.hidden);
- the rotated K and V the target cached in its last sliding layer and its last full layer, at the
  positions below the last token's.
Drafts are greedy (argmax of the assistant's logits), as transformers drafts them, so propose() returns
no probabilities: each draft's distribution is one-hot.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import SLIDING
from .errors import ModelLoadError
from .model.assistant import Assistant, build_assistant


def target_shared_kv(decoder, cache, row: int, n: int = 2**62) -> dict[str, tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]]:
    """Layer type -> (k, v [1, KV, S, D], positions [1, S]) of the target's last layer of that type, for
    the positions below n the row holds, in the target's dtype."""
    types = decoder.config.layer_types
    shared = {}
    for kind in set(types):
        last = max(i for i, t in enumerate(types) if t == kind)
        k, v, pos = decoder.layers[last].self_attn.keys_values(cache, last, row, n)
        shared[kind] = (k[None].to(decoder.dtype), v[None].to(decoder.dtype), pos[None])
    return shared


def check_pair(assistant_config, target_config) -> None:
    """ValueError (one line) when the assistant cannot draft for this target."""
    a, t = assistant_config.text, target_config
    if assistant_config.backbone_hidden_size != t.hidden_size:
        raise ValueError(f"backbone_hidden_size: the assistant was trained for a target of hidden size "
                         f"{assistant_config.backbone_hidden_size}, this target has {t.hidden_size}")
    if a.vocab_size != t.vocab_size:
        raise ValueError(f"vocab_size: the assistant has {a.vocab_size} tokens, the target {t.vocab_size}")
    for kind in set(a.layer_types):
        if kind not in t.layer_types:
            raise ValueError(f"layer_types: the assistant has {kind} layers, the target none to share KV from")
        ai = a.layer_types.index(kind)
        ti = max(i for i, x in enumerate(t.layer_types) if x == kind)
        if a.head_dim_of(ai) != t.head_dim_of(ti) or a.num_attention_heads % t.kv_heads_of(ti):
            raise ValueError(f"head_dim: the assistant's {kind} queries ({a.num_attention_heads} heads of "
                             f"{a.head_dim_of(ai)}) do not fit the target's KV ({t.kv_heads_of(ti)} heads of "
                             f"{t.head_dim_of(ti)})")
    if SLIDING in a.layer_types and a.sliding_window != t.sliding_window:
        raise ValueError(f"sliding_window: the assistant's is {a.sliding_window}, the target's {t.sliding_window}")


class AssistantDrafter:
    """Drafter over a Gemma 4 target (a Decoder, or a Model holding one)."""

    def __init__(self, assistant: Assistant, target):
        self.assistant = assistant
        self.target = getattr(target, "decoder", target)
        check_pair(assistant.config, self.target.config)

    @torch.no_grad()
    def propose(self, ctx, k: int) -> tuple[list[int], torch.Tensor | None]:
        if k <= 0:
            return [], None
        decoder = ctx.decoder
        device = self.assistant.pre_projection.weight.device
        shared = {kind: tuple(t.to(device) for t in kv)
                  for kind, kv in target_shared_kv(decoder, ctx.cache, ctx.row, ctx.position).items()}
        pos = torch.tensor([ctx.position], device=device)
        scale = torch.tensor(decoder.config.embed_scale, dtype=decoder.dtype)
        hidden = ctx.hidden.reshape(1, -1).to(device)
        token = ctx.tokens[-1]
        drafts: list[int] = []
        for _ in range(k):
            ids = torch.tensor([token], device=decoder.device)
            embeds = (decoder.embed_tokens(ids) * scale).to(device)
            logits, hidden = self.assistant(embeds, hidden, pos, shared)
            token = int(logits[0].argmax())
            drafts.append(token)
        return drafts, None


def load_drafter(path: str | Path, target_model, dtype: torch.dtype | None = None) -> AssistantDrafter:
    """The assistant at `path` drafting for `target_model` (a Model or a Decoder), in the target's dtype
    and device. ValueError (a ModelLoadError) when `path` is not a Gemma 4 assistant or does not fit the
    target, so a caller can try it as an ordinary draft model instead."""
    from .checkpoint.assistant import open_assistant

    decoder = getattr(target_model, "decoder", target_model)
    checkpoint = open_assistant(path)
    try:
        check_pair(checkpoint.config, decoder.config)
    except ValueError as e:
        raise ModelLoadError(f"{Path(path).name}: {e}") from None
    assistant = build_assistant(checkpoint, dtype or decoder.dtype, decoder.device)
    return AssistantDrafter(assistant, decoder)



