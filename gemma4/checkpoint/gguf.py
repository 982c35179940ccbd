"""A GGUF file (as llama.cpp writes gemma3 and gemma4) -> config + named tensors + tokenizer metadata.

The file is memory-mapped (gguf_file.py); a tensor is dequantised, by the `gguf` package, only when it
is read.
GGUF metadata is turned into the HF config.json fields it stands for, so one parser
(ModelConfig.from_hf) validates both formats.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config.common import FULL, SLIDING
from ..config.text import ModelConfig
from ..errors import ModelLoadError
from . import names
from .gguf_file import GGUFFile

ARCHITECTURES = ("gemma3", "gemma4")
ROPE_FREQS = "rope_freqs.weight"


class GGUFCheckpoint:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.file = GGUFFile(self.path)
        self.metadata = self.file.metadata
        arch = self.architecture = self.metadata.get("general.architecture")
        self._check_architecture(arch)
        self._tensors = self.file.tensors
        self._converted = None  # the mapped cache entry (prepare_quantized)
        self._ours: dict[str, str] = {}
        for gguf_name in self._tensors:
            if gguf_name == ROPE_FREQS:
                continue
            ours = names.from_gguf(gguf_name)
            if ours is None:
                raise ModelLoadError(f"{gguf_name}: tensor not known for architecture {arch}")
            self._ours[ours] = gguf_name
        self._configure()

    def _check_architecture(self, arch: Any) -> None:
        if arch not in ARCHITECTURES:
            raise ModelLoadError(f"general.architecture: unsupported {arch!r} (supported: {', '.join(ARCHITECTURES)})")

    def _configure(self) -> None:
        """raw_config (the config.json fields the metadata stands for) and config."""
        self.raw_config = self._hf_config()
        self.config = ModelConfig.from_hf(self.raw_config)

    # ---- metadata -> config.json fields ----------------------------------------------
    def _key(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def _need(self, key: str) -> Any:
        value = self._key(key)
        if value is None:
            raise ModelLoadError(f"{self.architecture}.{key}: missing from GGUF metadata")
        return value

    def _hf_config(self) -> dict[str, Any]:
        n_layers = int(self._need("block_count"))
        heads = _per_layer(self._need("attention.head_count"), n_layers, "attention.head_count")
        if len(set(heads)) != 1:
            raise ModelLoadError("attention.head_count: a different head count per layer is not supported")
        embd = self._tensors.get("token_embd.weight")
        if embd is None:
            raise ModelLoadError("token_embd.weight: missing from GGUF file")
        ff = _per_layer(self._need("feed_forward_length"), n_layers, "feed_forward_length")
        shared = int(self._key("attention.shared_kv_layers", 0) or 0)
        # The one per-layer MLP width there is: KV-shared layers twice as wide (use_double_wide_mlp).
        double_wide = len(set(ff)) == 2 and 0 < shared < n_layers and ff == [
            ff[0] if i < n_layers - shared else 2 * ff[0] for i in range(n_layers)]
        if len(set(ff)) != 1 and not double_wide:
            raise ModelLoadError("feed_forward_length: a different MLP width per layer is not supported")
        cfg: dict[str, Any] = dict(
            vocab_size=int(embd.shape[0]),
            hidden_size=int(self._need("embedding_length")),
            intermediate_size=ff[0],
            num_hidden_layers=n_layers,
            num_attention_heads=heads[0],
            rms_norm_eps=float(self._key("attention.layer_norm_rms_epsilon", 1e-6)),
            max_position_embeddings=int(self._key("context_length", 131072)),
            final_logit_softcapping=self._key("final_logit_softcapping"),
            tie_word_embeddings="output.weight" not in self._tensors,
            bos_token_id=self.metadata.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=self.metadata.get("tokenizer.ggml.eos_token_id"),
            pad_token_id=self.metadata.get("tokenizer.ggml.padding_token_id"),
            sliding_window=int(self._key("attention.sliding_window", 0)) or None,
            use_double_wide_mlp=double_wide,
        )
        kv = _per_layer(self._need("attention.head_count_kv"), n_layers, "attention.head_count_kv")
        theta_full = float(self._key("rope.freq_base", 1_000_000.0))
        theta_swa = float(self._key("rope.freq_base_swa", 10_000.0))
        if self.architecture == "gemma3":
            return self._gemma3(cfg, kv, theta_full, theta_swa)
        return self._gemma4(cfg, kv, theta_full, theta_swa)

    def _gemma3(self, cfg, kv, theta_full, theta_swa) -> dict[str, Any]:
        n = cfg["num_hidden_layers"]
        head_dim = int(self._need("attention.key_length"))
        full_rope: dict[str, Any] = {"rope_type": "default", "rope_theta": theta_full}
        if self._key("rope.scaling.type") == "linear" and self._key("rope.scaling.factor"):
            full_rope = {"rope_type": "linear", "rope_theta": theta_full, "factor": float(self._key("rope.scaling.factor"))}
        pattern = self._key("attention.sliding_window_pattern")
        if isinstance(pattern, list):
            layer_types = [SLIDING if swa else FULL for swa in pattern]
        else:
            period = int(pattern or 6)
            layer_types = [SLIDING if (i + 1) % period else FULL for i in range(n)]
        # llama.cpp's rule for the query scale, which the GGUF does not store: 1/sqrt(head_dim), except
        # the 62-layer (27B) model, which uses 1/sqrt(hidden / heads).
        pre_attn = cfg["hidden_size"] // cfg["num_attention_heads"] if n == 62 else head_dim
        if len(set(kv)) != 1:
            raise ModelLoadError("attention.head_count_kv: per-layer KV heads are not supported for gemma3")
        return dict(cfg, model_type="gemma3_text", head_dim=head_dim, num_key_value_heads=kv[0],
                    layer_types=layer_types, query_pre_attn_scalar=pre_attn,
                    rope_parameters={FULL: full_rope, SLIDING: {"rope_type": "default", "rope_theta": theta_swa}})

    def _gemma4(self, cfg, kv, theta_full, theta_swa) -> dict[str, Any]:
        n = cfg["num_hidden_layers"]
        pattern = self._need("attention.sliding_window_pattern")
        if not isinstance(pattern, list) or len(pattern) != n:
            raise ModelLoadError("attention.sliding_window_pattern: expected one boolean per layer")
        layer_types = [SLIDING if swa else FULL for swa in pattern]
        head_full = int(self._need("attention.key_length"))
        head_swa = int(self._key("attention.key_length_swa", head_full))
        swa_kv = {kv[i] for i in range(n) if layer_types[i] == SLIDING} or {kv[0]}
        full_kv = {kv[i] for i in range(n) if layer_types[i] == FULL} or swa_kv
        if len(swa_kv) != 1 or len(full_kv) != 1:
            raise ModelLoadError("attention.head_count_kv: KV heads must be the same within each layer type")
        full_layers = [i for i, t in enumerate(layer_types) if t == FULL]
        k_eq_v = bool(full_layers) and all(f"blk.{i}.attn_v.weight" not in self._tensors for i in full_layers)
        overrides = {i: {"head_dim": head_full, "num_key_value_heads": next(iter(full_kv))} for i in full_layers}

        # Full layers rotate the first pairs only; llama.cpp marks the unrotated ones with a huge factor.
        partial = 1.0
        if ROPE_FREQS in self._tensors:
            factors = self.tensor_data(ROPE_FREQS).reshape(-1)
            partial = float((factors < 1e20).sum()) * 2 / head_full
        swa_rot = int(self._key("rope.dimension_count_swa", head_swa))
        if swa_rot != head_swa:
            raise ModelLoadError(f"{self.architecture}.rope.dimension_count_swa: partial RoPE on sliding layers is not supported")

        experts = int(self._key("expert_count", 0) or 0)
        moe = dict(enable_moe_block=experts > 0)
        if experts:
            moe.update(num_experts=experts, top_k_experts=int(self._need("expert_used_count")),
                       moe_intermediate_size=int(_per_layer(self._need("expert_feed_forward_length"), n,
                                                            "expert_feed_forward_length")[0]))
        return dict(cfg, **moe, model_type="gemma4_text", head_dim=head_swa, num_key_value_heads=next(iter(swa_kv)),
                    layer_types=layer_types, attention_k_eq_v=k_eq_v, per_layer_config=overrides,
                    hidden_size_per_layer_input=int(self._key("embedding_length_per_layer_input", 0) or 0),
                    vocab_size_per_layer_input=int(self._tensors["per_layer_token_embd.weight"].shape[0])
                    if "per_layer_token_embd.weight" in self._tensors else None,
                    num_kv_shared_layers=int(self._key("attention.shared_kv_layers", 0) or 0),
                    rope_parameters={
                        SLIDING: {"rope_type": "default", "rope_theta": theta_swa},
                        FULL: {"rope_type": "proportional", "rope_theta": theta_full, "partial_rotary_factor": partial},
                    })

    # ---- tensors ------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._ours)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._tensors[self._ours[name]].shape

    def tensor_types(self) -> dict[str, int]:
        """GGML type name -> number of tensors of that type."""
        counts: dict[str, int] = {}
        for t in self._tensors.values():
            counts[t.type.name] = counts.get(t.type.name, 0) + 1
        return counts

    def weight_bytes(self) -> int:
        return sum(t.n_bytes for t in self._tensors.values())

    def tensor_data(self, gguf_name: str) -> np.ndarray:
        return self.file.dequantized(gguf_name)

    def prepare_quantized(self, names) -> None:
        """Map the converted forms of these tensors (our names) from the cache, converting them there
        first where this file has no entry yet (converted.py): quantized() then hands out mapped views."""
        from .converted import open_or_convert

        self._converted = open_or_convert(self.path, list(names), self._convert)

    def quantized(self, name: str):
        """The tensor as a QuantWeight from its GGUF blocks (never dequantised to float when the block
        layout maps onto ours), or None for float tensors (F32, F16, BF16): mapped from the converted
        cache after prepare_quantized(), else converted in memory."""
        if self._converted is not None and name in self._converted:
            return self._converted.get(name)
        return self._convert(name)

    def _convert(self, name: str):
        from .gguf_blocks import from_gguf

        info = self._tensors[self._ours[name]]
        return from_gguf(self.file.raw(info.name), info.type, info.shape)

    def tensor(self, name: str) -> torch.Tensor:
        data = self.tensor_data(self._ours[name])
        return torch.from_numpy(data if data.flags.writeable else data.copy())

    def load_tokenizer(self):
        from ..tokenizer import Tokenizer

        if "tokenizer.ggml.tokens" not in self.metadata:
            raise ModelLoadError(f"{self.path.name}: no tokenizer in the GGUF metadata (tokenizer.ggml.tokens)")
        from ..filecache import cached

        return Tokenizer.from_gguf_metadata(self.metadata, cache=lambda kind, build: cached(kind, self.path, build))

    def chat_template(self) -> str | None:
        return self.metadata.get("tokenizer.chat_template")


def _per_layer(value: Any, n_layers: int, key: str) -> list[int]:
    if isinstance(value, list):
        if len(value) != n_layers:
            raise ModelLoadError(f"{key}: {len(value)} values for {n_layers} layers")
        return [int(v) for v in value]
    return [int(value)] * n_layers

