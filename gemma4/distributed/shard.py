"""A rank's decoder: the model's modules in their shard's shapes, loaded through the one slicing function."""

from __future__ import annotations

import torch

from ..config.text import ModelConfig
from ..model.decoder import Decoder
from ..model.load import build_decoder
from ..model.moe import Router
from ..quant.modules import Embedding, Linear
from . import layers
from .mirror import ShardedDecoder
from .sharding import Plan


class Layout:
    """What build_decoder asks of a shard: its modules (build), each tensor's part (cut), whether the fused
    native layer applies (fused), and the wrapping of the vocabulary after loading (finish)."""

    def __init__(self, plan: Plan, config: ModelConfig):
        self.plan, self.config = plan, config
        self.local = plan.local_config(config)
        self.fused = not plan.tensor  # see layers.py: the fused calls norm before the sum over ranks

    def build(self, config: ModelConfig) -> ShardedDecoder:
        """The shard's modules (under the caller's meta device)."""
        plan, h = self.plan, config.hidden_size
        decoder = Decoder(self.local)
        decoder.__class__ = ShardedDecoder
        if config.enable_moe_block:
            start, end = plan.experts_of(config)
            for layer in decoder.layers:
                layer.router = Router(config)  # every rank routes over all experts
                layer.experts = layers.LocalExperts(config, start, end - start, reduce=not plan.tensor)
        if plan.tensor:
            v0, v1 = plan.vocab(config)
            decoder.embed_tokens = Embedding(v1 - v0, h, _weight=torch.empty(v1 - v0, h))
            if decoder.lm_head is not None:
                decoder.lm_head = Linear(h, v1 - v0, bias=False)
            for layer in decoder.layers:
                layers.install(layer)
        return decoder

    def cut(self, name: str, w):
        return self.plan.cut(self.config, name, w)

    def finish(self, decoder: ShardedDecoder) -> ShardedDecoder:
        if self.plan.tensor:
            sizes = self.plan.vocab_sizes(self.config)
            decoder.embed_tokens = layers.VocabShard(decoder.embed_tokens, self.plan.vocab(self.config)[0], sizes)
            if decoder.lm_head is not None:
                decoder.lm_head = layers.GatheredHead(decoder.lm_head, sizes)
        decoder.config = self.config  # what the model is; its KV (this rank's heads) follows kv_config
        decoder.kv_config = self.local
        return decoder


def build_shard(checkpoint, plan: Plan, dtype: torch.dtype, device: torch.device, progress: bool = False,
                quantize: str | None = None) -> ShardedDecoder:
    layout = Layout(plan, checkpoint.config)
    decoder = layout.finish(build_decoder(checkpoint, dtype, device, progress=progress, quantize=quantize,
                                          layout=layout))
    if decoder.device.type == "cpu":  # built (or found) now: a rank compiling inside a step stalls the others
        from ..native import compiled

        compiled()
    return decoder
