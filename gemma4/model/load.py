"""Build a Decoder from a checkpoint reader: check every tensor's name and shape, then place it.

The module is built on the meta device, so nothing is allocated twice; each tensor is read from the
memory-mapped file, converted to its dtype and device, and assigned.
"""

from __future__ import annotations

import sys

import torch

from ..errors import ModelLoadError
from .decoder import Decoder

# Checkpoint entries that are not weights of ours and carry no meaning for inference.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _target_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    # Norm weights stay float32: the norms compute in float32 and these tensors are tiny.
    return torch.float32 if name.endswith("norm.weight") else dtype


def build_decoder(checkpoint, dtype: torch.dtype, device: torch.device, progress: bool = True) -> Decoder:
    config = checkpoint.config
    with torch.device("meta"):
        decoder = Decoder(config)
    expected = {name: tuple(t.shape) for name, t in decoder.state_dict().items()}

    available = set(checkpoint.names())
    for name in sorted(available - set(expected)):
        if name == "lm_head.weight" and config.tie_word_embeddings or name.endswith(_IGNORED_SUFFIXES):
            continue
        raise ModelLoadError(f"{name}: unexpected tensor in checkpoint (does config.json match the weights?)")
    for name, shape in expected.items():
        if name not in available:
            raise ModelLoadError(f"{name}: missing from checkpoint")
        got = checkpoint.shape(name)
        if tuple(got) != shape and not (name.endswith("layer_scalar") and int(torch.Size(got).numel()) == 1):
            raise ModelLoadError(f"{name}: shape {list(got)} in checkpoint, expected {list(shape)}")

    names = list(expected)
    bar = None
    if progress and sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=len(names), desc="loading", unit="tensor", leave=False)
    state = {}
    for name in names:
        t = checkpoint.tensor(name).reshape(expected[name])
        state[name] = t.to(device=device, dtype=_target_dtype(name, dtype))
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    decoder.load_state_dict(state, strict=True, assign=True)
    decoder.to(device)  # the non-persistent buffers (RoPE frequencies) were built on the CPU
    decoder.eval()
    decoder.requires_grad_(False)
    return decoder
