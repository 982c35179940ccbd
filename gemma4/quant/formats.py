"""Weight formats: a matrix stored as small integers with a float scale (and offset) per group.

    w[n, k] = scale[n, k // group] * q[n, k] + zero[n, k // group]

- int4: q in 0..15, group 32, packed two per byte as GGML packs a 32-element block: byte j of a
  group holds element j (low nibble) and element j + 16 (high nibble).
  With group 256 (Q4_K; 4.75 bits per weight, the file 4.5): scale and zero per 256, and `sub` int8
  holding each 32's integer scale and offset multiplier: w = scale * sub[2b] * q + zero * sub[2b + 1].
- int8: q in -128..127 (one byte each), group 32 or 16; `zero` may be None.
- int6 (Q6_K): codes c in 0..63, w = scale[n, k // 256] * sub[n, k // 16] * (c - 32), `sub` int8.
  Packed per 128 elements (blocks j = 0..3 of 32) in 96 bytes: 32 bytes whose byte i holds the low 4
  bits of element i of block 0 (low nibble) and block 1 (high nibble), 32 bytes the same for blocks 2
  and 3, then 32 bytes whose byte i holds bits 4-5 of element i of block j at bits 2j, 2j+1 (one load
  decodes two blocks, one more their high bits). 6.63 bits per weight with the scales (the file: 6.56).

Scales and offsets are float32, so a GGUF block's f16 scale times its integer sub-scale is exact; int8
from GGUF keeps the file's f16 scales (and offsets) as they are (0.5 bit per weight less). So Q4_0, Q4_1
(int4 g32), Q4_K (int4 g256), Q8_0, Q5_0, Q5_1 (int8 g32) and Q6_K (int6) convert losslessly, and
dequantise to the very float32 values the `gguf` package produces. Other GGUF types are dequantised
and re-quantised to int8 g32 (lossy). The conversions are checkpoint/gguf_blocks.py.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass
class QuantWeight:
    bits: int                 # 4, 6 or 8
    group: int                # elements per scale
    q: torch.Tensor           # int4: uint8 [..., N, K/2]; int6: uint8 [..., N, 3K/4]; int8: int8 [..., N, K]
    scale: torch.Tensor       # float32 [..., N, K/group] (int8 from GGUF: float16)
    zero: torch.Tensor | None  # like scale, or None (symmetric)
    # int6: int8 [..., N, K/16], the scale of each 16 elements within a group; int4 with group 256 (Q4_K):
    # int8 [..., N, K/16], the scale and the offset multiplier of each block of 32 (interleaved)
    sub: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        k = self.q.shape[-1] * {4: 2, 6: 4 / 3, 8: 1}[self.bits]
        return (*self.q.shape[:-1], int(k))

    @functools.cached_property
    def int8_layout(self) -> bool:
        """Whether the int8-activation CPU kernels take this weight (the layouts their check_layout accepts)."""
        k = self.shape[-1]
        if self.bits == 6:
            return k % 256 == 0 and self.group == 256 and self.sub is not None and self.zero is None
        if self.bits == 4 and self.group == 256:
            return k % 256 == 0 and self.sub is not None and self.zero is not None
        return k % 32 == 0 and self.sub is None and (self.group == 32 or (self.group == 16 and self.bits == 8 and self.zero is None))

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        return self.q, self.scale, self.zero, self.sub

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors() if t is not None)

    def to(self, device) -> "QuantWeight":
        mv = lambda t: None if t is None else t.to(device)
        return QuantWeight(self.bits, self.group, *map(mv, self.tensors()))

    def __getitem__(self, index) -> "QuantWeight":
        """Index the leading (expert or row) dimensions."""
        pick = lambda t: None if t is None else t[index]
        return QuantWeight(self.bits, self.group, *map(pick, self.tensors()))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float matrix, computed as scale * q + zero in float32 (plain torch, any device)."""
        *lead, n, k = self.shape
        g = self.group
        if self.bits == 6:
            c = unpack6(self.q.reshape(*lead, n, k // 128, 96)).to(torch.float32) - 32
            step = self.scale.repeat_interleave(g // 16, dim=-1) * self.sub.to(torch.float32)  # per 16
            return (c.reshape(*lead, n, k // 16, 16) * step[..., None]).reshape(*lead, n, k).to(dtype)
        if self.bits == 4 and self.sub is not None:  # Q4_K: w = d sc q + zero m per block of 32
            step = self.scale.repeat_interleave(g // 32, dim=-1) * self.sub[..., 0::2].to(torch.float32)
            offset = self.zero.repeat_interleave(g // 32, dim=-1) * self.sub[..., 1::2].to(torch.float32)
            return QuantWeight(4, 32, self.q, step, offset).dequantize(dtype)
        if self.bits == 4:
            packed = self.q.reshape(*lead, n, k // 32, 16)
            q = torch.cat([packed & 15, packed >> 4], dim=-1).to(torch.float32)
        else:
            q = self.q.reshape(*lead, n, k // g, g).to(torch.float32)
        q = q.reshape(*lead, n, k // g, g)
        w = q * self.scale[..., None]
        if self.zero is not None:
            w = w + self.zero[..., None]
        return w.reshape(*lead, n, k).to(dtype)


# ---- quantise float weights at load ------------------------------------------------------
def quantize_int8(w: torch.Tensor, group: int = 32) -> QuantWeight:
    """Symmetric: scale = max|w| / 127 per group, q = round(w / scale)."""
    *lead, n, k = w.shape
    _check_k(k, group)
    g = w.float().reshape(*lead, n, k // group, group)
    scale = g.abs().amax(-1) / 127
    q = torch.round(g / torch.where(scale == 0, 1, scale)[..., None]).clamp(-127, 127).to(torch.int8)
    return QuantWeight(8, group, q.reshape(*lead, n, k), scale.contiguous(), None)


def quantize_int4(w: torch.Tensor, group: int = 32) -> QuantWeight:
    """Asymmetric: 16 levels from the group's min to its max (scale = (max - min) / 15, zero = min)."""
    *lead, n, k = w.shape
    _check_k(k, 32)
    g = w.float().reshape(*lead, n, k // 32, 32)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = (hi - lo) / 15
    q = torch.round((g - lo[..., None]) / torch.where(scale == 0, 1, scale)[..., None]).clamp(0, 15).to(torch.uint8)
    return QuantWeight(4, 32, _pack4(q).reshape(*lead, n, k // 2), scale.contiguous(), lo.contiguous())


def pack6(c: torch.Tensor) -> torch.Tensor:
    """Codes [..., 128k] in 0..63 -> uint8 [..., 96k], the int6 layout (see the module docstring)."""
    c = c.to(torch.uint8).reshape(*c.shape[:-1], -1, 4, 32)  # [..., units, block j, element i]
    low = c & 15
    high = c >> 4
    pairs = [low[..., 0, :] | (low[..., 1, :] << 4), low[..., 2, :] | (low[..., 3, :] << 4)]
    shifted = high[..., 0, :] | (high[..., 1, :] << 2) | (high[..., 2, :] << 4) | (high[..., 3, :] << 6)
    return torch.cat([*pairs, shifted], dim=-1).flatten(-2).contiguous()


def unpack6(p: torch.Tensor) -> torch.Tensor:
    """uint8 [..., units, 96] -> codes uint8 [..., units * 128] (the inverse of pack6)."""
    pairs = p[..., :64].reshape(*p.shape[:-1], 2, 1, 32)
    low = torch.cat([pairs & 15, pairs >> 4], dim=-2).flatten(-3, -2)  # [..., 4, 32], blocks 0 1 2 3
    high = torch.stack([(p[..., 64:] >> (2 * j)) & 3 for j in range(4)], dim=-2)  # [..., 4, 32]
    return (low | (high << 4)).flatten(-3)


def _check_k(k: int, group: int) -> None:
    if k % group:
        raise ValueError(f"row length {k} is not a multiple of the quantisation group {group}")


def _pack4(q: torch.Tensor) -> torch.Tensor:
    """[..., 32] values 0..15 -> [..., 16] bytes, element j low nibble, j + 16 high."""
    return (q[..., :16] | (q[..., 16:] << 4)).contiguous()
