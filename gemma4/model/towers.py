"""Filling a tower (vision, audio, an embedder) built on the meta device from its checkpoint reader (.names(),
.shape(), .tensor()): every name and shape checked, one clear error for the first that is wrong."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..errors import ModelLoadError


def load_checked(model: nn.Module, checkpoint, device: torch.device, dtype_of: Callable[[str], torch.dtype], *,
                 unexpected: str, missing: str, refuse: Callable[[str], str | None] = lambda name: None) -> nn.Module:
    """model's tensors from checkpoint, each in dtype_of(name) on device. Errors: "<name>: unexpected
    <unexpected>", "<name>: missing from the <missing>", refuse(name)'s message for an extra name it explains."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    available = set(checkpoint.names())
    for name in sorted(available - set(expected)):
        raise ModelLoadError(refuse(name) or f"{name}: unexpected {unexpected}")
    state = {}
    for name, shape in expected.items():
        if name not in available:
            raise ModelLoadError(f"{name}: missing from the {missing}")
        got = tuple(checkpoint.shape(name))
        if got != shape:
            raise ModelLoadError(f"{name}: shape {list(got)} in checkpoint, expected {list(shape)}")
        state[name] = checkpoint.tensor(name).to(device=device, dtype=dtype_of(name))
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    model.requires_grad_(False)
    return model
