"""Drafters for speculative decoding, behind one interface (verify.Drafter.propose).

PromptLookup copies n-grams of the prompt and output so far; DraftModel drafts with any smaller model of the
target's vocabulary; AssistantDrafter drafts with a Gemma 4 assistant checkpoint, reading the target's
states. drafter_for picks the one a --draft-model file makes. They sit above the engine: the layer that
makes a request (the Python API, the CLI, the server) hands the engine its drafter.

What the assistant reads from the target, per round (nothing is copied or kept between rounds):
- the target's embedding row of the last token (scaled by sqrt(target hidden), as the target embeds);
- the target's final-normed hidden state that produced that token (DraftContext.hidden);
- the rotated K and V the target cached in its last sliding layer and its last full layer, at the
  positions below the last token's.
Its drafts are greedy (argmax of the assistant's logits), as transformers drafts them, so propose() returns
no probabilities: each draft's distribution is one-hot.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..checkpoint.assistant import is_assistant, open_assistant
from ..config.common import SLIDING
from ..engine.runner import prefill
from ..errors import ModelLoadError
from ..model.assistant import Assistant, build_assistant
from ..kv import common_prefix
from .verify import MAX_DRAFT, DraftContext

if TYPE_CHECKING:
    from ..kv import KVCache


class PromptLookup:
    """Drafts by copying: the longest n-gram (max_ngram down to min_ngram) ending the tokens so far that
    also occurred earlier is looked up, and the tokens that followed its latest earlier occurrence are
    proposed. No extra model; it pays where the answer copies its context (summaries, code edits, RAG)."""

    def __init__(self, max_ngram: int = 4, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"prompt lookup: need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, ctx: DraftContext, k: int) -> tuple[list[int], None]:
        tokens = ctx.tokens
        t = torch.tensor(tokens, dtype=torch.long)
        for n in range(min(self.max_ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            suffix = t[-n:]
            windows = t[:-1].unfold(0, n, 1)  # every earlier n-gram (the suffix itself excluded)
            hits = (windows == suffix).all(dim=1).nonzero()
            if hits.numel():
                start = int(hits[-1]) + n
                return tokens[start:start + k], None
        return [], None


class DraftModel:
    """Drafts greedily with a smaller model of the same vocabulary. It keeps its own KV cache per target
    row, holding the tokens it has seen; each proposal rolls it back to where they still agree with the
    target's tokens (or starts the row over when its rings cannot go back that far)."""

    def __init__(self, draft, target=None, max_draft: int = MAX_DRAFT):
        """draft, target: api.Model (or Decoder) objects; with target, their vocabularies must agree."""
        self.decoder = getattr(draft, "decoder", draft)
        if target is not None:
            check_vocabulary(draft, target)
        self.tail = max_draft
        self._rows: dict[int, tuple["KVCache", list[int]]] = {}

    def release(self, row: int) -> None:
        self._rows.pop(row, None)

    @torch.inference_mode()
    def propose(self, ctx: DraftContext, k: int) -> tuple[list[int], None]:
        vocab, target_vocab = self.decoder.config.vocab_size, ctx.decoder.config.vocab_size
        if vocab != target_vocab:
            raise ValueError(f"draft model: vocabulary of {vocab} tokens, the target's has {target_vocab}")
        tokens = ctx.tokens
        cache, held = self._rows.get(ctx.row, (None, []))
        if cache is None:
            cache = self.decoder.new_cache(batch=1, capacity=len(tokens) + k + 1, tail=self.tail)
        keep = min(common_prefix(held, tokens), len(tokens) - 1)  # the last token is fed for its logits
        try:
            cache.truncate(0, keep)
        except ValueError:  # rolled back further than the rings reach: start the row over
            cache.clear(0)
            keep = 0
        device = self.decoder.device
        ids = torch.tensor([tokens[keep:]], dtype=torch.long, device=device)
        pos = torch.arange(keep, len(tokens), device=device)[None]
        hidden = prefill(self.decoder, cache, ids, pos)
        drafts = [int(torch.argmax(self.decoder.logits(hidden)[0]))]
        while len(drafts) < k:
            at = len(tokens) + len(drafts) - 1
            hidden = self.decoder(torch.tensor([[drafts[-1]]], device=device),
                                  torch.tensor([[at]], device=device), cache)[:, -1]
            drafts.append(int(torch.argmax(self.decoder.logits(hidden)[0])))
        self._rows[ctx.row] = (cache, tokens + drafts[:-1])
        return drafts, None


def check_vocabulary(draft, target) -> None:
    """ValueError unless the draft model speaks the target's vocabulary (same size, same token texts)."""
    dv, tv = draft.config.vocab_size, target.config.vocab_size
    if dv != tv:
        raise ValueError(f"draft model: its vocabulary has {dv} tokens, the target's {tv}: a draft model "
                         "must use the target's tokenizer")
    dtok, ttok = getattr(draft, "tokenizer", None), getattr(target, "tokenizer", None)
    if dtok is None or ttok is None:
        return
    a, b = _vocabulary(dtok), _vocabulary(ttok)
    if a != b:
        differ = next((i for i in range(max(len(a), len(b))) if a.get(i) != b.get(i)), None)
        raise ValueError(f"draft model: its tokenizer differs from the target's (token {differ}: "
                         f"{a.get(differ)!r} against {b.get(differ)!r}): a draft model must use the "
                         "target's tokenizer")


def _vocabulary(tokenizer) -> dict[int, str]:
    backend = getattr(tokenizer, "_backend", None)
    if backend is not None and hasattr(backend, "get_vocab"):
        return {i: t for t, i in backend.get_vocab(with_added_tokens=True).items()}
    return {i: tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size)}


def drafter_for(path, target, max_draft: int = MAX_DRAFT, **load_kwargs):
    """The drafter a --draft-model file makes for `target` (an api.Model).

    A Gemma 4 assistant checkpoint (checkpoint/assistant.py) becomes an AssistantDrafter reading the
    target's states; any other model file is loaded as a draft model of the target's vocabulary."""
    if is_assistant(path):
        return load_drafter(path, target)
    draft = target.load_like(path, **load_kwargs)  # the target's dtype and device
    return DraftModel(draft, target, max_draft=max_draft)


# ---- the Gemma 4 assistant ------------------------------------------------------------------------
def target_shared_kv(decoder, cache, row: int, n: int = 2**62) -> dict[str, tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]]:
    """Layer type -> (k, v [1, KV, S, D], positions [1, S]) of the target's last layer of that type, for
    the positions below n the row holds, in the target's dtype (an E-model's last layers keep no KV: the
    layer that stores what they read)."""
    types = decoder.config.layer_types
    shared = {}
    for kind in set(types):
        last = decoder.config.kv_source_layer(max(i for i, t in enumerate(types) if t == kind))
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
    decoder = getattr(target_model, "decoder", target_model)
    checkpoint = open_assistant(path)
    try:
        check_pair(checkpoint.config, decoder.config)
    except ValueError as e:
        raise ModelLoadError(f"{Path(path).name}: {e}") from None
    assistant = build_assistant(checkpoint, dtype or decoder.dtype, decoder.device)
    return AssistantDrafter(assistant, decoder)
