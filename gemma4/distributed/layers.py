"""The parallel layers: a rank's share of the model, with the collectives that join the shares.

- VocabShard: this rank's rows of the (tied) embedding; a lookup is summed over ranks (each rank fills the
  ids in its range), the output head's logits are gathered on rank 0.
- LocalExperts: this rank's routed experts; the router runs on every rank (its weights are whole), each rank
  computes the (token, expert) pairs routed to its experts and the partial sums are all-reduced. An
  all-reduce of the [tokens, hidden] partial sums rather than an all-to-all dispatch: every rank already
  holds every token (attention is replicated or itself split by heads), so nothing needs sending to the
  experts, and the sum is exact to rounding; an all-to-all pays where ranks hold different tokens.
- TensorParallelLayer: the decoder layer over head-split attention and a width-split dense MLP, with one
  all-reduce after attention and one per MLP block (in a MoE layer the dense MLP's and the experts' partial
  outputs, both computed from the same residual, go in one all-reduce). The native fused layer is not used
  under tensor parallelism: its calls put a norm right after o and down, before the sum over ranks.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..config.text import ModelConfig
from ..model.layers import gelu_tanh_mul
from ..model.moe import Experts
from ..native.ops import expert_matmul
from .comm import all_reduce, gather_last


class VocabShard(nn.Module):
    """Rows [start, start + n) of the embedding `inner` (Embedding or QuantEmbedding); `sizes`: every
    rank's row count (for the gather of logits)."""

    def __init__(self, inner: nn.Module, start: int, sizes: list[int]):
        super().__init__()
        self.inner, self.start, self.sizes = inner, start, sizes

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n = self.sizes[torch.distributed.get_rank()]
        mine = (ids >= self.start) & (ids < self.start + n)
        rows = self.inner(torch.where(mine, ids - self.start, 0))
        return all_reduce(rows * mine[..., None].to(rows.dtype))

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over the whole vocabulary on rank 0 (this rank's columns elsewhere)."""
        return gather_last(self.inner.linear(x), self.sizes)


class GatheredHead(nn.Module):
    """An untied output head split by vocabulary rows: logits gathered on rank 0."""

    def __init__(self, inner: nn.Module, sizes: list[int]):
        super().__init__()
        self.inner, self.sizes = inner, sizes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gather_last(self.inner(x), self.sizes)


class LocalExperts(Experts):
    """Experts [start, start + count) of the model's; forward gives the sum over ranks (reduce=True) or this
    rank's partial sum (reduce=False: the caller all-reduces it with other partial sums)."""

    def __init__(self, config: ModelConfig, start: int, count: int, reduce: bool = True):
        super().__init__(_with_experts(config, count))
        self.start, self.reduce = start, reduce

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = self.partial(x, experts, weights)
        return all_reduce(out) if self.reduce else out

    def partial(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """This rank's experts' share of the routed sum, [N, hidden]: the pairs (token, expert) routed here,
        grouped by expert, through the kernels one process would pick for all N tokens (the choice follows the
        whole batch's size, not this rank's share of it, so each pair's product rounds as in one process):
        few tokens, the per-pair expert kernel; a prefill on the matrix engine, the grouped products; else a
        loop over the experts hit."""
        out = torch.zeros_like(x)
        local = (experts >= self.start) & (experts < self.start + self.num_experts)
        tokens, slots = local.nonzero(as_tuple=True)
        if tokens.numel() == 0:
            return out
        ids = experts[tokens, slots] - self.start
        order = torch.argsort(ids, stable=True)
        tokens, ids, pair_weights = tokens[order], ids[order], weights[tokens[order], slots[order]]
        if x.shape[0] <= self.FUSED_MAX_TOKENS:
            gate_up = expert_matmul(x[tokens], self.gate_up_proj, ids)
            if gate_up is not None:
                gate, up = gate_up.chunk(2, dim=-1)
                y = expert_matmul(gelu_tanh_mul(gate, up), self.down_proj, ids, pair_weights, 1)
                if y is not None:
                    return out.index_add_(0, tokens, y.to(out.dtype))
        hit, counts = torch.unique_consecutive(ids, return_counts=True)
        return self._by_expert(x, tokens, hit.tolist(), counts.tolist(), pair_weights, out, rows=experts.numel())


def _with_experts(config: ModelConfig, count: int) -> ModelConfig:
    return dataclasses.replace(config, num_experts=count)


class TensorParallelLayer:
    """Mixed in before a decoder layer's class (install): the layer's forward with the sums over ranks."""

    def forward(self, h: torch.Tensor, qpos: torch.Tensor, kv, sees_until: torch.Tensor | None = None,
                per_layer_input: torch.Tensor | None = None) -> torch.Tensor:
        a = all_reduce(self.self_attn(self.input_layernorm(h), qpos, kv, sees_until))
        h = self.post_attention_layernorm(a, residual=h)

        r = h
        m = self.mlp(self.pre_feedforward_layernorm(r))  # this rank's share of the dense MLP
        if self.moe:
            flat = r.reshape(-1, r.shape[-1])
            weights, experts = self.router(flat)
            y = self.experts.partial(self.pre_feedforward_layernorm_2(flat), experts, weights).view_as(r)
            both = all_reduce(torch.cat([m, y], dim=-1))
            m, y = both.split(r.shape[-1], dim=-1)
            m = self.post_feedforward_layernorm_2(y, residual=self.post_feedforward_layernorm_1(m))
        else:
            m = all_reduce(m)
        h = self.post_feedforward_layernorm(m, residual=r)
        return self.finish(h, per_layer_input)  # whole on every rank: the per-layer input and the layer scalar


_CLASSES: dict[type, type] = {}


def install(layer) -> None:
    """Makes a decoder layer run TensorParallelLayer's forward (its modules and tensors stay as they are)."""
    cls = type(layer)
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"TensorParallel{cls.__name__}", (TensorParallelLayer, cls), {"__module__": __name__})
    layer.__class__ = _CLASSES[cls]
