"""Which part of each weight a rank holds: the one place tensors are sliced for tensor and expert parallelism.

Tensor parallel over W ranks (Megatron's split): each rank holds H/W query heads and the KV heads they read
(KV heads split with them where W divides their count; where the count divides W, as on Gemma 4's global
layers with 1 or 2 K=V heads, each KV head is held by the W/KV ranks whose query heads read it), q/k/v split
by rows (column-parallel), o split by columns (row-parallel); the dense MLP's gate/up by rows and down by
columns; the vocabulary (the tied embedding, which is also the output head) by rows. Expert parallel:
each rank holds a contiguous 1/W of the routed experts. Under tensor parallelism the experts are split by
expert too (an expert's 704-wide intermediate does not split on Q4_K's 256-column blocks). Routers and
norms are whole on every rank.

A split along a quantised matrix's columns (o, down) must fall on its blocks: the intermediate is cut in
units of 256 columns where it divides, else 32 (every GGUF block size divides one of them), as evenly as
those units allow; heads are cut whole (their width is the unit).
"""

from __future__ import annotations

import dataclasses
import re


from ..config.text import ModelConfig
from ..quant.formats import QuantWeight


def split(total: int, parts: int, unit: int = 1) -> list[tuple[int, int]]:
    """[start, end) of each of `parts` contiguous ranges covering `total`, in whole units, as even as the
    units allow (the first ranges one unit longer)."""
    units, rest = divmod(total, unit)
    if rest or units < parts:
        raise ValueError(f"cannot split {total} into {parts} parts of whole {unit}-wide units")
    base, extra = divmod(units, parts)
    bounds, at = [], 0
    for p in range(parts):
        n = (base + (p < extra)) * unit
        bounds.append((at, at + n))
        at += n
    return bounds


def column_unit(width: int, parts: int) -> int:
    """The unit a matrix with rows of `width` columns is cut in for `parts` ranks: 256 (K-quant super-blocks)
    where it divides into enough of them, else 32 (every other GGUF block), else 1 (float only)."""
    return next(u for u in (256, 32, 1) if width % u == 0 and width // u >= parts)


@dataclasses.dataclass(frozen=True)
class Plan:
    """One rank's share: rank of world; tensor (attention, dense MLP, vocabulary split) and experts (split by
    expert) parallel."""

    rank: int
    world: int
    tensor: bool
    experts: bool

    def __post_init__(self):
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} outside a world of {self.world}")

    @classmethod
    def of(cls, rank: int, tensor_parallel: int, expert_parallel: int) -> "Plan":
        """tensor_parallel / expert_parallel: 1 or the world size (both over the same ranks)."""
        world = max(tensor_parallel, expert_parallel)
        for name, n in (("tensor_parallel", tensor_parallel), ("expert_parallel", expert_parallel)):
            if not isinstance(n, int) or n < 1 or n not in (1, world):
                raise ValueError(f"{name}: must be 1 or the number of ranks ({world}), got {n!r}")
        return cls(rank, world, tensor_parallel > 1, tensor_parallel > 1 or expert_parallel > 1)

    # ---- ranges ----------------------------------------------------------------------------
    def heads(self, config: ModelConfig) -> tuple[int, int]:
        h = config.num_attention_heads
        if h % self.world:
            raise ValueError(f"tensor_parallel {self.world}: does not divide the {h} attention heads")
        n = h // self.world
        return self.rank * n, (self.rank + 1) * n

    def kv_heads(self, config: ModelConfig, layer: int) -> tuple[int, int]:
        kv = config.kv_heads_of(layer)
        if kv % self.world == 0:
            n = kv // self.world
            return self.rank * n, (self.rank + 1) * n
        if self.world % kv == 0:  # each KV head on the world/kv ranks whose query heads read it
            head = self.rank // (self.world // kv)
            return head, head + 1
        raise ValueError(f"tensor_parallel {self.world}: layer {layer}'s {kv} KV heads neither split over nor "
                         f"divide {self.world} ranks")

    def intermediate(self, width: int) -> tuple[int, int]:
        return split(width, self.world, column_unit(width, self.world))[self.rank]

    def vocab(self, config: ModelConfig) -> tuple[int, int]:
        return split(config.vocab_size, self.world)[self.rank]

    def vocab_sizes(self, config: ModelConfig) -> list[int]:
        return [b - a for a, b in split(config.vocab_size, self.world)]

    def experts_of(self, config: ModelConfig) -> tuple[int, int]:
        return split(config.num_experts, self.world)[self.rank]

    # ---- the shard's shape -----------------------------------------------------------------
    def local_config(self, config: ModelConfig) -> ModelConfig:
        """The config of this rank's modules and KV: local heads, KV heads and MLP width (tensor parallel);
        everything else as the model's."""
        if not self.tensor:
            return config
        a, b = self.heads(config)
        overrides = {}
        for i in range(config.num_hidden_layers):
            k0, k1 = self.kv_heads(config, i)
            overrides[i] = {**config.layer_overrides.get(i, {}), "num_key_value_heads": k1 - k0}
        i0, i1 = self.intermediate(config.intermediate_size)
        return dataclasses.replace(config, num_attention_heads=b - a, layer_overrides=overrides,
                                   intermediate_size=i1 - i0)

    # ---- the one slicing function ------------------------------------------------------------
    def cut(self, config: ModelConfig, name: str, w):
        """This rank's part of the checkpoint tensor `name` (a float tensor or a QuantWeight), a copy of
        only that part (nothing of the whole tensor is kept); whole tensors for what every rank holds."""
        rows = cols = None
        layer = _layer(name)
        if self.experts and name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            rows = self.experts_of(config)  # the stacked experts' leading dimension
        elif self.tensor:
            if name in ("embed_tokens.weight", "lm_head.weight"):
                rows = self.vocab(config)
            elif name.endswith(".self_attn.q_proj.weight"):
                rows = _scaled(self.heads(config), config.head_dim_of(layer))
            elif name.endswith((".self_attn.k_proj.weight", ".self_attn.v_proj.weight")):
                rows = _scaled(self.kv_heads(config, layer), config.head_dim_of(layer))
            elif name.endswith(".self_attn.o_proj.weight"):
                cols = _scaled(self.heads(config), config.head_dim_of(layer))
            elif name.endswith((".mlp.gate_proj.weight", ".mlp.up_proj.weight")):
                rows = self.intermediate(config.intermediate_size)
            elif name.endswith(".mlp.down_proj.weight"):
                cols = self.intermediate(config.intermediate_size)
        if rows is not None:
            return _rows(w, *rows)
        if cols is not None:
            return _columns(w, *cols, name)
        return w


def _layer(name: str) -> int:
    m = re.match(r"layers\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def _scaled(r: tuple[int, int], by: int) -> tuple[int, int]:
    return r[0] * by, r[1] * by


def _rows(w, a: int, b: int):
    """Rows a..b of the leading dimension (an expert stack's experts, a matrix's output rows)."""
    if isinstance(w, QuantWeight):
        return QuantWeight(w.bits, w.group, *(None if t is None else t[a:b].clone() for t in w.tensors()))
    return w[a:b].clone()


def _columns(w, a: int, b: int, name: str):
    """Columns a..b of a matrix [N, K]; a quantised one's every tensor cut at the same fraction of its last
    dimension (its blocks are laid out along K), which must fall on whole blocks."""
    if not isinstance(w, QuantWeight):
        return w[..., a:b].clone()
    k = w.shape[-1]
    block = max(w.group, 32, 128 if w.bits == 6 else 1)
    if a % block or b % block:
        raise ValueError(f"{name}: a split at columns {a}..{b} cuts its {block}-column quantisation blocks")

    def part(t):
        if t is None:
            return None
        n = t.shape[-1]
        return t[..., a * n // k:b * n // k].clone()

    return QuantWeight(w.bits, w.group, *(part(t) for t in w.tensors()))
