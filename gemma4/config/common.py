"""The words every config module shares: the two attention layer types, the RoPE a layer type takes,
and the one activation the model code implements."""

from __future__ import annotations

from dataclasses import dataclass

SLIDING = "sliding_attention"
FULL = "full_attention"
SUPPORTED_ACTIVATION = "gelu_pytorch_tanh"


@dataclass(frozen=True)
class RopeSpec:
    """Inverse frequencies theta^(-2i/d) for the first `partial_rotary_factor * d/2` pairs, zero for
    the rest, all divided by `factor` (linear scaling). Covers `default`, `linear` and `proportional`."""

    theta: float
    partial_rotary_factor: float = 1.0
    factor: float = 1.0

