"""The mixture-of-experts block: router and experts."""

from __future__ import annotations

import torch
from torch import nn

from ..config.text import ModelConfig
from ..native.ops import expert_matmul, grouped_product
from ..quant.modules import matmul
from .layers import RMSNorm, gelu_tanh_mul


class Router(nn.Module):
    """p = softmax(proj(rmsnorm(x) * scale * hidden^-0.5)) over all experts in float32; the top-k
    probabilities renormalised to sum 1, each times its expert's per_expert_scale."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        h, e = config.hidden_size, config.num_experts
        self.top_k = config.top_k_experts
        self.root = h**-0.5
        self.norm = RMSNorm(h, config.rms_norm_eps, with_scale=False)
        self.proj = nn.Linear(h, e, bias=False)
        self.scale = nn.Parameter(torch.ones(h), requires_grad=False)
        self.per_expert_scale = nn.Parameter(torch.ones(e), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.norm(x) * self.scale * self.root
        probs = torch.softmax(self.proj(z), dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.per_expert_scale[experts], experts


class Experts(nn.Module):
    """Expert e: down_e(gelu_tanh(gate) * up), gate/up the two halves of gate_up_proj[e] @ x.

    Tokens are grouped by expert (one sort), and only experts that were hit run: a decode step
    touches top_k experts' weights, a prefill one matmul per expert hit (on the matrix engine, all of them in
    two grouped calls). The two stacked matrices are
    float parameters or, once loaded quantised, QuantParam modules indexed by expert.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        e, h, i = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts = e
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(e, h, i), requires_grad=False)

    # Up to this many tokens (decode steps of a batch) the routed experts run as two native calls.
    FUSED_MAX_TOKENS = 4
    # Under a memory budget (model/residency.py): told which experts run, to page them in ahead.
    residency = None
    residency_layer = 0

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x: [N, hidden]; experts, weights: [N, k]."""
        if self.residency is not None:
            self.residency.route(self.residency_layer, experts)
        if x.shape[0] <= self.FUSED_MAX_TOKENS:
            out = self._fused(x, experts, weights)
            if out is not None:
                return out
        k = experts.shape[1]
        flat = experts.reshape(-1)
        order = torch.argsort(flat, stable=True)
        hit, counts = torch.unique_consecutive(flat[order], return_counts=True)
        flat_weights = weights.reshape(-1)
        out = torch.zeros_like(x)
        return self._by_expert(x, order // k, hit.tolist(), counts.tolist(), flat_weights[order], out)

    def _by_expert(self, x: torch.Tensor, tokens: torch.Tensor, hit: list[int], counts: list[int],
                   pair_weights: torch.Tensor, out: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """The (token, expert) pairs sorted by expert (counts[i] pairs for expert hit[i]) into out: the grouped
        products where they apply (rows: as _grouped), else a loop over the experts hit, never all of them."""
        grouped = self._grouped(x, tokens, hit, counts, pair_weights, out, rows)
        if grouped is not None:
            return grouped
        start = 0
        for e, count in zip(hit, counts):
            picked = tokens[start:start + count]
            gate, up = matmul(x[picked], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = matmul(gelu_tanh_mul(gate, up), self.down_proj[e])
            out.index_add_(0, picked, (y * pair_weights[start:start + count, None]).to(out.dtype))
            start += count
        return out

    def _grouped(self, x: torch.Tensor, tokens: torch.Tensor, hit: list[int], counts: list[int],
                 pair_weights: torch.Tensor, out: torch.Tensor, rows: int | None = None) -> torch.Tensor | None:
        """Every expert hit in two grouped calls (a prefill on the matrix engine): the (token, expert) pairs sorted
        by expert, gate_up for all, the activation, down for all, the weighted sum into out; None where the
        grouped product does not apply (rows: the pair count its rule judges, default these pairs')."""
        offsets = [0]
        for c in counts:
            offsets.append(offsets[-1] + c)
        gate_up = grouped_product(x, self.gate_up_proj, hit, offsets, rows, tokens=tokens)
        if gate_up is None:
            return None
        gate, up = gate_up.chunk(2, dim=-1)
        y = grouped_product(gelu_tanh_mul(gate, up), self.down_proj, hit, offsets, rows)
        weighted = y.mul_(pair_weights[:, None]) if y.dtype == pair_weights.dtype else y * pair_weights[:, None]
        return out.index_add_(0, tokens, weighted.to(out.dtype))

    def _fused(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor | None:
        """Each token's k routed experts in two native calls (gate_up, then down with the weighted sum),
        no Python loop; None when the weights are not quantised or the kernel does not apply."""
        k = experts.shape[1]
        ids = experts.reshape(-1)
        gate_up = expert_matmul(x.repeat_interleave(k, dim=0), self.gate_up_proj, ids)
        if gate_up is None:
            return None
        gate, up = gate_up.chunk(2, dim=-1)
        out = expert_matmul(gelu_tanh_mul(gate, up), self.down_proj, ids, weights.reshape(-1), k)
        return None if out is None else out.to(x.dtype)
