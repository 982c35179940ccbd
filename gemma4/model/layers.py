"""Building blocks shared by the decoder: RMSNorm, rotary embeddings and the gated GELU MLP."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..config.common import RopeSpec
from ..native.ops import rms_norm, rope
from ..quant.modules import Linear


class RMSNorm(nn.Module):
    """x * (mean(x^2) + eps)^-0.5 * weight, computed in float32.

    The weight multiplies directly (Gemma 4). Gemma 3 checkpoints store `w` for `1 + w`; the
    checkpoint readers add the 1 at load, so one norm serves both. Weightless norms (v_norm, the
    router's) have `with_scale=False`.
    """

    def __init__(self, dim: int, eps: float, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32), requires_grad=False) if with_scale else None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """norm(x), or residual + norm(x) in one pass (the decoder's residual adds)."""
        y = rms_norm(x, self.weight, self.eps, residual)  # one native pass where it applies
        if y is not None:
            return y
        h = x.float()
        h = h * torch.pow(h.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.weight is not None:
            h = h * self.weight
        h = h.type_as(x)
        return h if residual is None else residual + h


def rope_inv_freq(spec: RopeSpec, head_dim: int) -> torch.Tensor:
    """Inverse frequencies for a head of `head_dim` channels (half of them: rotate-half pairs i, i+d/2).

    Proportional RoPE rotates only the first `partial_rotary_factor * d/2` pairs; their exponent
    still divides by the whole head_dim, and the remaining frequencies are zero (not rotated).
    """
    rotated = int(spec.partial_rotary_factor * head_dim // 2)
    # Built on the CPU explicitly: models are constructed under the meta device before loading.
    exponents = torch.arange(0, 2 * rotated, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv = 1.0 / (spec.theta**exponents)
    inv = torch.cat([inv, torch.zeros(head_dim // 2 - rotated, device="cpu")])
    return inv / spec.factor


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [*positions.shape, head_dim], computed in float32 and cast to `dtype`."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, heads, D]; cos/sin: [B, T, D]."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE of x [B, T, heads, D] at positions [B, T] (negative ones as 0): one native pass on the CPU
    (float32), else rope_cos_sin + apply_rope."""
    y = rope(x, positions, inv_freq)
    if y is not None:
        return y
    cos, sin = rope_cos_sin(inv_freq, positions.clamp(min=0), x.dtype)
    return apply_rope(x, cos, sin)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def gelu_tanh_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up, the same bits, written over gate (a product's fresh output, not read again) where no
    autograd records: a prefill's activations are MBs, and two fresh tensors of that size cost more than the
    arithmetic (their pages are faulted in)."""
    if (gate.shape != up.shape or gate.dtype != up.dtype
            or (torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad))
            or (gate.is_inference() and not torch.is_inference_mode_enabled())):
        return gelu_tanh(gate) * up
    return torch.ops.aten.gelu_(gate, approximate="tanh").mul_(up)


class GatedMLP(nn.Module):
    """down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=False)
        self.up_proj = Linear(hidden, intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu_tanh_mul(self.gate_proj(x), self.up_proj(x)))
