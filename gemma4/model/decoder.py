"""The Gemma 3 / Gemma 4 text decoder: embedding, layers, final norm, tied head, logit softcap.

Reads top to bottom like the forward pass in reference/gemma4-formats.md. Gemma 3 and Gemma 4 differ
only by config fields (attention_scale, use_v_norm, use_layer_scalar, enable_moe_block, rope).
"""

from __future__ import annotations

import torch
from torch import nn

from ..cache import KVCache
from ..config import ModelConfig
from ..native import compiled, ops
from ..quant.modules import Linear, QuantLinear, matmul
from .attention import Attention
from .layers import GatedMLP, RMSNorm
from .moe import Experts, Router


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(config, layer)
        self.mlp = GatedMLP(h, config.intermediate_size)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)
        self.moe = config.enable_moe_block
        if self.moe:
            self.router = Router(config)
            self.experts = Experts(config)
            self.post_feedforward_layernorm_1 = RMSNorm(h, eps)
            self.post_feedforward_layernorm_2 = RMSNorm(h, eps)
            self.pre_feedforward_layernorm_2 = RMSNorm(h, eps)
        if config.use_layer_scalar:
            self.register_buffer("layer_scalar", torch.ones(1))
        else:
            self.layer_scalar = None

    def forward(self, h: torch.Tensor, qpos: torch.Tensor, kv, sees_until: torch.Tensor | None = None) -> torch.Tensor:
        native = self._native(h)
        if native is not None:
            return self._forward_native(native, h, qpos, kv, sees_until)
        h = self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), qpos, kv, sees_until), residual=h)

        residual = h
        m = self.mlp(self.pre_feedforward_layernorm(residual))
        if self.moe:
            m = self._experts(residual, self.post_feedforward_layernorm_1(m))
        h = self.post_feedforward_layernorm(m, residual=residual)

        if self.layer_scalar is not None:
            h = h * self.layer_scalar
        return h

    def _experts(self, residual: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """The MoE block's sum of the dense MLP's output m (after its own norm) and the routed experts'."""
        flat = residual.reshape(-1, residual.shape[-1])
        weights, experts = self.router(flat)  # routed on the residual, not the normed input
        e = self.experts(self.pre_feedforward_layernorm_2(flat), experts, weights).view_as(residual)
        return self.post_feedforward_layernorm_2(e, residual=m)

    def _native(self, h: torch.Tensor):
        """This layer's native plan (see _plan_native) where it applies to h: on the CPU in float32 with
        int8 activations; else None."""
        if h.device.type != "cpu" or h.dtype != torch.float32 or ops.activations() != "int8":
            return None
        if self._native_plan is None:
            self._native_plan = self._plan_native()
        rows = h.numel() // h.shape[-1]
        if self._native_plan and rows >= ops.MIN_BLAS_ROWS and any(  # prefill: the modules pick per matrix
                ops.blas_first(x.qweight, rows) for x in self._dense_linears()):
            return None
        return self._native_plan or None

    def _dense_linears(self) -> list:
        a, m = self.self_attn, self.mlp
        return [x for x in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj) if x is not None]

    # What the native path needs, gathered on first use (a decode step would otherwise pay ~25 module
    # attribute lookups per layer); None: not planned yet (set it so after replacing a matrix), False: the
    # layer has a matrix the kernel does not take.
    _native_plan = None

    def _apply(self, fn, *args, **kwargs):  # .to(), .float() and the like replace the tensors planned with
        self._native_plan = None
        return super()._apply(fn, *args, **kwargs)

    def _plan_native(self):
        """(kernel, attn_in's weights, attn_out's, mlp_block's) when every matrix is a QuantLinear in a layout
        the kernel takes and the norms share one eps; else False."""
        kernel = compiled()
        a, m = self.self_attn, self.mlp
        linears = self._dense_linears()
        norms = [self.input_layernorm, self.post_attention_layernorm, self.pre_feedforward_layernorm,
                 self.post_feedforward_layernorm, a.q_norm, a.k_norm, *([a.v_norm] if a.v_norm else [])]
        if (kernel is None or not all(isinstance(x, QuantLinear) and x.qweight.int8_layout for x in linears)
                or len({n.eps for n in norms}) != 1):
            return False
        eps = self.input_layernorm.eps
        attn_in = (self.input_layernorm.weight, eps, _packed(a.q_proj), _packed(a.k_proj),
                   None if a.v_proj is None else _packed(a.v_proj), a.q_norm.weight, a.k_norm.weight,
                   a.v_norm is not None)
        rope = (a.inv_freq, a.heads, a.kv_heads, a.head_dim)
        attn_out = (_packed(a.o_proj), self.post_attention_layernorm.weight, eps)
        post = self.post_feedforward_layernorm_1 if self.moe else self.post_feedforward_layernorm
        mlp = (self.pre_feedforward_layernorm.weight, eps, _packed(m.gate_proj), _packed(m.up_proj),
               _packed(m.down_proj), post.weight)
        return kernel, attn_in, rope, attn_out, mlp

    def _forward_native(self, plan, h, qpos, kv, sees_until):
        """forward() with the norms, projections, RoPE and MLP of the layer in native calls (same bits)."""
        native, attn_in, rope, attn_out, mlp = plan
        q, k, v = native.attn_in(h, *attn_in, qpos, *rope)
        att = self.self_attn.over_cache(q, k, v, qpos, kv, sees_until)
        h = native.attn_out(att, *attn_out, h)
        if self.moe:
            h = self.post_feedforward_layernorm(self._experts(h, native.mlp_block(h, *mlp, None)), residual=h)
        else:
            h = native.mlp_block(h, *mlp, h)
        if self.layer_scalar is not None:
            h = h * self.layer_scalar
        return h


def _packed(linear: QuantLinear) -> tuple:
    """A QuantLinear's matrix as the native fused ops take it."""
    w = linear.qweight
    return w.q, w.scale, w.zero, w.bits, w.group, w.sub


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # Given its (empty) weight, nn.Embedding skips its random init: under the meta device that init
        # imports torch's compiler stack (~2 s of every load).
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype (a quantised embedding carries it, having no float weight)."""
        return getattr(self.embed_tokens, "dtype", None) or self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def new_cache(self, batch: int = 1, capacity: int = 256, tail: int = 0, kv_dtype: str = "float") -> KVCache:
        return KVCache(self.config, batch, capacity, self.dtype, self.device, tail=tail, kv_dtype=kv_dtype)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                embeds: torch.Tensor | None = None, embeds_mask: torch.Tensor | None = None) -> torch.Tensor:
        """ids, positions: [B, T] (position -1 marks left padding). Returns final-normed hidden states.

        embeds [B, T, hidden] replace the token embeddings where embeds_mask [B, T] is set: image soft
        tokens, already in the model's space (not scaled). With use_bidirectional_attention "vision",
        each run of them attends to itself both ways on sliding layers; a call must hold whole runs.
        """
        sees_until = None
        if embeds_mask is not None:
            ids = ids.masked_fill(embeds_mask, 0)  # soft-token ids need no embedding row
        # The scale is rounded to the weight dtype first, as the reference does.
        h = self.embed_tokens(ids) * torch.tensor(self.config.embed_scale, dtype=self.dtype)
        if embeds_mask is not None:
            h = torch.where(embeds_mask[..., None], embeds.to(h.dtype), h)
            if self.config.use_bidirectional_attention == "vision":
                sees_until = run_ends(positions, embeds_mask)
        for i, (layer, kv) in enumerate(zip(self.layers, cache.layers)):
            h = layer(h, positions, kv, sees_until if self.config.is_sliding(i) else None)
        return self.norm(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits, soft-capped: cap * tanh(logits / cap)."""
        if self.lm_head is not None:
            logits = self.lm_head(hidden)
        elif hasattr(self.embed_tokens, "linear"):  # quantised tied embedding
            logits = self.embed_tokens.linear(hidden)
        else:
            logits = matmul(hidden, self.embed_tokens.weight)
        logits = logits.float()
        cap = self.config.final_logit_softcapping
        if cap:  # in place: a vocabulary-wide temporary per op costs more than the op
            logits = logits.div_(cap).tanh_().mul_(cap)
        return logits


def run_ends(positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T]: for a position inside a run of set mask entries, the position of the run's last entry;
    elsewhere the position itself."""
    t = mask.shape[1]
    index = torch.arange(t, device=mask.device).expand_as(mask)
    is_last = mask & ~torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)
    nearest_last = torch.where(is_last, index, t).flip(1).cummin(1).values.flip(1)
    return positions.gather(1, torch.where(mask, nearest_last, index))
