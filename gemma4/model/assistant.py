"""The Gemma 4 assistant (multi-token-prediction drafter), as transformers' Gemma4AssistantForCausalLM
computes it.

One draft step at position P (the position of the last token, which the target has not cached yet):
  x = pre_projection(cat(target_embed(token) * sqrt(backbone_hidden), h))   h: a backbone-sized state
  each layer: a Gemma 4 decoder layer whose attention has queries only — its keys and values are the
    target's, from the target's last full-attention layer (full layers) or last sliding layer (sliding
    layers), at positions < P; the query is rotated at P
  y = norm(x);  logits = y @ embed_tokens^T (no softcap), or the centroid-masked head below;
  next h = post_projection(y)
The position stays P for every draft of a round; the next draft feeds the drafted token and next h.

Sliding layers see the target's keys at P-W-1 .. P-1 (W+1 keys: the reference's bidirectional window
mask, |distance| <= W, over the target's keys ending at P-1).

Masked head (use_ordered_embeddings): token_ordering lists the vocabulary cluster by cluster
(num_centroids clusters of vocab/num_centroids tokens); the top-k clusters by `centroids(y)` are scored
exactly, every other token gets the row's lowest score minus 1.
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from torch.nn import functional as F

from ..config.assistant import AssistantConfig
from ..config.common import FULL
from ..config.text import ModelConfig
from ..errors import ModelLoadError
from .layers import GatedMLP, RMSNorm, apply_rope, rope_cos_sin, rope_inv_freq


class SharedKVAttention(nn.Module):
    """Queries over keys and values another model computed: q_proj, q_norm, RoPE, o_proj."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.heads, self.head_dim = config.num_attention_heads, config.head_dim_of(layer)
        self.scale = config.attention_scale
        self.q_proj = nn.Linear(config.hidden_size, self.heads * self.head_dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(config.rope_of(layer), self.head_dim), persistent=False)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        """x: [B, 1, hidden]; pos: [B]; k, v: [B, KV, S, D]; mask: [B, 1, 1, S] booleans or None."""
        b = x.shape[0]
        cos, sin = rope_cos_sin(self.inv_freq, pos[:, None], x.dtype)
        q = apply_rope(self.q_norm(self.q_proj(x).view(b, 1, self.heads, self.head_dim)), cos, sin)
        if k.shape[-1] != self.head_dim or self.heads % k.shape[1]:
            raise ValueError(f"shared KV of shape {list(k.shape)} does not fit {self.heads} heads of {self.head_dim}")
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.to(x.dtype), v.to(x.dtype), attn_mask=mask,
                                             scale=self.scale, enable_gqa=self.heads != k.shape[1])
        return self.o_proj(out.transpose(1, 2).reshape(b, 1, self.heads * self.head_dim))


class AssistantLayer(nn.Module):
    """A Gemma 4 decoder layer (dense MLP) over shared KV."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.kind = config.layer_types[layer]
        self.self_attn = SharedKVAttention(config, layer)
        self.mlp = GatedMLP(h, config.intermediate_size)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)
        self.register_buffer("layer_scalar", torch.ones(1))

    def forward(self, h, pos, k, v, mask):
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), pos, k, v, mask))
        h = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        return h * self.layer_scalar


class MaskedEmbedder(nn.Module):
    """The centroid-masked output head (use_ordered_embeddings)."""

    def __init__(self, config: AssistantConfig):
        super().__init__()
        self.top_k = config.centroid_intermediate_top_k
        self.num_centroids = config.num_centroids
        self.centroids = nn.Linear(config.text.hidden_size, config.num_centroids, bias=False)
        self.register_buffer("token_ordering", torch.zeros(config.text.vocab_size, dtype=torch.long))

    def forward(self, y: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """y: [B, hidden]; head: [vocab, hidden]. Returns [B, vocab] in y's dtype."""
        top = self.centroids(y).topk(self.top_k, dim=-1).indices  # [B, top_k]
        ids = self.token_ordering.view(self.num_centroids, -1)[top].flatten(1)  # [B, top_k * per cluster]
        scores = (head[ids] @ y[:, :, None])[..., 0]
        # The reference fills with the minimum over the whole batch; per row is the same for one row and
        # keeps rows independent.
        fill = scores.min(dim=-1, keepdim=True).values - 1.0
        out = fill.expand(-1, head.shape[0]).clone()
        return out.scatter_(1, ids, scores)


def shared_kv_mask(kpos: torch.Tensor, pos: torch.Tensor, window: int | None) -> torch.Tensor | None:
    """[B, 1, 1, S]: which shared keys (positions kpos [B, S], -1 empty) a query at pos [B] attends to:
    every cached position below pos; on sliding layers only the last window + 1 of them."""
    p = pos[:, None]
    allowed = (kpos >= 0) & (kpos < p)
    if window is not None:
        allowed &= kpos >= p - window - 1
    if bool(allowed.all()):
        return None
    return allowed[:, None, None]


class Assistant(nn.Module):
    def __init__(self, config: AssistantConfig):
        super().__init__()
        self.config = config
        t = config.text
        self.embed_tokens = nn.Embedding(t.vocab_size, t.hidden_size)  # the (tied) output head only
        self.layers = nn.ModuleList(AssistantLayer(t, i) for i in range(t.num_hidden_layers))
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.lm_head = None if t.tie_word_embeddings else nn.Linear(t.hidden_size, t.vocab_size, bias=False)
        self.pre_projection = nn.Linear(2 * config.backbone_hidden_size, t.hidden_size, bias=False)
        self.post_projection = nn.Linear(t.hidden_size, config.backbone_hidden_size, bias=False)
        self.masked_embedding = MaskedEmbedder(config) if config.use_ordered_embeddings else None

    @property
    def dtype(self) -> torch.dtype:
        return self.pre_projection.weight.dtype

    def forward(self, token_embeds: torch.Tensor, hidden: torch.Tensor, pos: torch.Tensor,
                shared: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """One draft step for B rows.

        token_embeds: [B, backbone] the target's scaled embedding of the last token; hidden: [B, backbone];
        pos: [B] the last token's position; shared: layer type -> (k, v [B, KV, S, D], kpos [B, S]) of the
        target's last layer of that type. Returns float32 logits [B, vocab] and the next hidden [B, backbone].
        """
        x = torch.cat([token_embeds, hidden], dim=-1).to(self.dtype)[:, None]
        h = self.pre_projection(x)
        masks = {kind: shared_kv_mask(kpos, pos, self.config.text.sliding_window if kind != FULL else None)
                 for kind, (_, _, kpos) in shared.items()}
        for layer in self.layers:
            k, v, _ = shared[layer.kind]
            h = layer(h, pos, k, v, masks[layer.kind])
        y = self.norm(h)[:, 0]
        head = self.lm_head.weight if self.lm_head is not None else self.embed_tokens.weight
        if self.masked_embedding is not None:
            logits = self.masked_embedding(y, head)
        else:
            logits = y @ head.T
        return logits.float(), self.post_projection(y)


def build_assistant(checkpoint, dtype: torch.dtype, device: torch.device | str = "cpu",
                    progress: bool = True) -> Assistant:
    """An Assistant from a reader with .config (AssistantConfig), .names(), .shape(), .tensor()."""
    config: AssistantConfig = checkpoint.config
    with torch.device("meta"):
        model = Assistant(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    available = set(checkpoint.names())
    for name in sorted(available - set(expected)):
        if name == "lm_head.weight" and config.text.tie_word_embeddings:
            continue
        if name.startswith("masked_embedding.") and not config.use_ordered_embeddings:
            continue  # a head the config does not use (the reference skips it too)
        raise ModelLoadError(f"{name}: unexpected tensor in an assistant checkpoint")
    for name, shape in expected.items():
        if name not in available:
            raise ModelLoadError(f"{name}: missing from the assistant checkpoint")
        got = tuple(checkpoint.shape(name))
        if got != shape and not (name.endswith("layer_scalar") and int(torch.Size(got).numel()) == 1):
            raise ModelLoadError(f"{name}: shape {list(got)} in checkpoint, expected {list(shape)}")
    names = list(expected)
    bar = None
    if progress and sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=len(names), desc="loading assistant", unit="tensor", leave=False)
    state = {}
    for name in names:
        t = checkpoint.tensor(name).reshape(expected[name])
        if name == "masked_embedding.token_ordering":
            ids = t.double()
            if not torch.equal(ids, ids.round()) or ids.min() < 0 or ids.max() >= config.text.vocab_size:
                raise ModelLoadError(f"{name}: token ids outside 0 .. {config.text.vocab_size - 1}")
            state[name] = t.to(device=device, dtype=torch.long)
        else:
            state[name] = t.to(device=device, dtype=torch.float32 if name.endswith("norm.weight") else dtype)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    model.load_state_dict(state, strict=True, assign=True)
    model.to(device)  # the RoPE frequencies were built on the CPU
    model.eval()
    model.requires_grad_(False)
    return model
