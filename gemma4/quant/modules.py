"""The quantised stand-ins for nn.Linear, nn.Embedding and the experts' stacked matrices.

The model code calls them as it calls the float modules (quantization as a swap of the linear
layer); `matmul(x, w)` multiplies by either kind of weight. Embedding and QuantEmbedding share the
tied head's interface (`linear`, `dtype`).
"""

from __future__ import annotations

import torch
from torch import nn

from .formats import QuantWeight
from ..native.ops import bf16_linear, qlinear


class QuantParam(nn.Module):
    """A QuantWeight held as buffers, so .to(device) and state_dict see its tensors."""

    def __init__(self, w: QuantWeight):
        super().__init__()
        self.bits, self.group = w.bits, w.group
        self.register_buffer("q", w.q)
        self.register_buffer("scale", w.scale)
        self.register_buffer("zero", w.zero)
        self.register_buffer("sub", w.sub)
        self._qweight = None

    @property
    def qweight(self) -> QuantWeight:
        """The buffers as a QuantWeight, built once (a decode step asks ~130 times) and again after
        .to() or any other replacement of the buffers."""
        b = self._buffers
        qw = self._qweight
        if qw is None or qw.q is not b["q"] or qw.scale is not b["scale"] or qw.zero is not b["zero"] or qw.sub is not b["sub"]:
            qw = self._qweight = QuantWeight(self.bits, self.group, b["q"], b["scale"], b["zero"], b["sub"])
        return qw

    @property
    def shape(self) -> tuple[int, ...]:
        return self.qweight.shape

    def __getitem__(self, index) -> QuantWeight:
        return self.qweight[index]

    def extra_repr(self) -> str:
        return f"int{self.bits}, group {self.group}, shape {list(self.shape)}"


class QuantLinear(QuantParam):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qlinear(x, self.qweight)


class QuantEmbedding(QuantParam):
    """Row lookup dequantises only the rows asked for; `linear` is the tied output head."""

    def __init__(self, w: QuantWeight, dtype: torch.dtype):
        super().__init__(w)
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight[ids].dequantize(self.dtype)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return qlinear(x, self.qweight)


class Embedding(nn.Embedding):
    """nn.Embedding that is also the tied output head, as QuantEmbedding is: `linear(x)` = x @ weight.T."""

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return matmul(x, self.weight)


class Linear(nn.Linear):
    """nn.Linear whose product goes through `matmul` (bf16 weights take the native kernel at decode)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return matmul(x, self.weight) if self.bias is None else super().forward(x)


def matmul(x: torch.Tensor, w) -> torch.Tensor:
    """x @ w.T for a float matrix or a QuantWeight."""
    if isinstance(w, QuantWeight):
        return qlinear(x, w)
    y = bf16_linear(x, w)
    return x @ w.T if y is None else y
