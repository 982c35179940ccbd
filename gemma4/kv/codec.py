"""How K and V are stored: as they come (the model's dtype), or int8 with one float32 scale per group of
32 values of a (token, head) vector.

One scale per whole vector costs 10-400x more KL than bf16 rounding on the test models (scores use
scale 1.0, so attention is sharp); groups of 32 bring it near bf16's. 0.56 of the bytes of bf16.

kv_bytes_per_token is what one token's K and V take in a layer, stored so: the one formula behind the KV
budget (a pool's bytes per token) and `gemma4 info`'s KV figures.
"""

from __future__ import annotations

import torch

from ..config.text import ModelConfig

KV_DTYPES = ("float", "int8")
INT8_GROUP = 32  # elements sharing one scale, as llama.cpp's q8_0 blocks


def check_kv_dtype(kv_dtype: str) -> None:
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_cache: unknown {kv_dtype!r} (use one of {', '.join(KV_DTYPES)})")


def int8_group(head_dim: int) -> int:
    """The largest divisor of head_dim not above INT8_GROUP."""
    return max(g for g in range(1, min(INT8_GROUP, head_dim) + 1) if head_dim % g == 0)


def quantize_int8(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., D] -> int8 values [..., D] and float32 scales [..., D / group]: x ~ q * scale per group."""
    g = x.float().unflatten(-1, (-1, group))
    scale = g.abs().amax(dim=-1).clamp(min=1e-12) / 127.0
    q = (g / scale[..., None]).round().clamp(-127, 127).to(torch.int8)
    return q.flatten(-2), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.unflatten(-1, (scale.shape[-1], -1)).float() * scale[..., None]).flatten(-2).to(dtype)


class Codec:
    """How one layer stores its K and V: as they come (the model's dtype) or int8 with group scales.
    A stored name ("k", "v") is one tensor, or with int8 two ("k" and "k_scale")."""

    def __init__(self, kv_dtype: str, head_dim: int, dtype: torch.dtype):
        check_kv_dtype(kv_dtype)
        self.int8 = kv_dtype == "int8"
        self.group = int8_group(head_dim)
        self.dtype = dtype  # what attention reads

    def shapes(self, name: str, head_dim: int) -> dict[str, tuple[int, torch.dtype]]:
        """Stored tensors of `name`: their last dimension and dtype."""
        if not self.int8:
            return {name: (head_dim, self.dtype)}
        return {name: (head_dim, torch.int8), name + "_scale": (head_dim // self.group, torch.float32)}

    def encode(self, name: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.int8:
            return {name: x}
        q, scale = quantize_int8(x, self.group)
        return {name: q, name + "_scale": scale}

    def decode(self, stored: dict[str, torch.Tensor], name: str) -> torch.Tensor | None:
        if name not in stored:
            return None
        if self.int8:
            return dequantize_int8(stored[name], stored[name + "_scale"], self.dtype)
        return stored[name]


def kv_bytes_per_token(config: ModelConfig, layer: int, kv_dtype: str = "float",
                       dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes one token's K and V take in decoder layer `layer`, stored as `kv_dtype` by a model computing
    in `dtype`: per KV head a V vector, and a K vector unless the layer has K=V, each as Codec stores it
    (int8: the values and their group scales). A KV-shared layer stores none."""
    if config.kv_shared(layer):
        return 0
    head_dim = config.head_dim_of(layer)
    vector = sum(last * dt.itemsize for last, dt in Codec(kv_dtype, head_dim, dtype).shapes("v", head_dim).values())
    return (1 if config.k_eq_v(layer) else 2) * config.kv_heads_of(layer) * vector
