"""What `gemma4 info` prints: a model described from its files without running it (architecture, experts, per-layer
embeddings, shared KV, parameters, its image and audio parts, the CPU's kernels, KV at a context)."""

from __future__ import annotations


def human(n: float, unit: str = "B") -> str:
    for prefix in ("", "Ki", "Mi", "Gi", "Ti"):
        if abs(n) < 1024 or prefix == "Ti":
            return f"{n:.1f} {prefix}{unit}" if prefix else f"{int(n)} {unit}"
        n /= 1024
    return str(n)


def count(n: int) -> str:
    for suffix, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{suffix}"
    return str(n)


def describe(spec: str | None, ctx: int | None = None, mmproj: str | None = None) -> int:
    from gemma4 import store
    from gemma4.checkpoint import open_checkpoint
    from gemma4.kv import kv_bytes_per_token, ring_slots

    found = store.find(spec)
    path = found.path
    ckpt = open_checkpoint(path)
    cfg = ckpt.config
    total, active = cfg.parameter_counts()
    n_full = sum(1 for t in cfg.layer_types if t == "full_attention")
    print(f"model          {path}")
    if found.source not in ("path", "embedded"):
        print(f"store          {found.source}: {found.explicit}")
    if mmproj is not None or found.mmproj is not None:
        print(f"projector      {mmproj if mmproj is not None else found.mmproj}")
    kind = cfg.model_type
    label = cfg.architecture if not kind or kind in (cfg.architecture, f"{cfg.architecture}_text") else \
        f"{cfg.architecture} ({kind})"
    print(f"architecture   {label}, {cfg.num_hidden_layers} layers ({cfg.num_hidden_layers - n_full} "
          f"sliding, window {cfg.sliding_window}; {n_full} full), hidden {cfg.hidden_size}, "
          f"{cfg.num_attention_heads} heads")
    if cfg.enable_moe_block:
        print(f"experts        {cfg.num_experts}, top-{cfg.top_k_experts}, width {cfg.moe_intermediate_size}; "
              f"dense MLP {cfg.intermediate_size}")
    if cfg.hidden_size_per_layer_input:
        table = cfg.vocab_size_per_layer_input * cfg.per_layer_input_size
        print(f"per-layer emb  {cfg.vocab_size_per_layer_input} x {cfg.num_hidden_layers} x "
              f"{cfg.hidden_size_per_layer_input} = {count(table)} parameters (a row per token: total, not active)")
    if cfg.num_kv_shared_layers:
        print(f"shared KV      the last {cfg.num_kv_shared_layers} layers read earlier layers' KV (layers "
              f"{cfg.first_kv_shared_layer}-{cfg.num_hidden_layers - 1}; they store none)"
              + (f"; their MLP {cfg.intermediate_size_of(cfg.num_hidden_layers - 1)} wide" if cfg.use_double_wide_mlp
                 else ""))
    print(f"parameters     {count(total)} total, {count(active)} active per token")
    print(f"context        {cfg.max_position_embeddings} tokens; vocabulary {cfg.vocab_size}")
    weights = ckpt.weight_bytes()
    print(f"tensor types   {', '.join(f'{k} x{v}' for k, v in sorted(ckpt.tensor_types().items()))}")
    print(f"weights        {human(weights)} on disk")
    print(f"chat template  {'yes' if ckpt.chat_template() else 'none (base model: raw completion)'}")
    _media(ckpt, mmproj, found.mmproj)
    from gemma4.native import isa

    print(f"CPU            {isa.describe()}")
    print(f"kernels        {isa.kernel_plan()}")
    contexts = [ctx] if ctx else sorted({min(8192, cfg.max_position_embeddings), cfg.max_position_embeddings})
    for c in contexts:
        kv = sum(kv_bytes_per_token(cfg, i) * (ring_slots(cfg.sliding_window, 0) if cfg.is_sliding(i) else c)
                 for i in range(cfg.num_hidden_layers))
        print(f"KV at {c:>6}   {human(kv)} (bf16); weights + KV {human(weights + kv)}")
    return 0


def _parameters(model_class, config) -> int:
    """A tower's parameters: those of our module built from its config (on the meta device: no memory), so the
    clipping bounds a reader also holds are not counted."""
    import torch

    with torch.device("meta"):
        return sum(p.numel() for p in model_class(config).parameters())


def _media(ckpt, mmproj, store_mmproj) -> None:
    """The image and audio parts, from the model's folder or its mmproj file (the readers gemma4.load takes)."""
    from gemma4.api import media_readers
    from gemma4.config import AudioConfig, VisionConfig
    from gemma4.config.unified import UnifiedVisionConfig, WaveformAudioConfig
    from gemma4.model.audio import AudioModel
    from gemma4.model.vision import VisionModel

    vision, audio = media_readers(ckpt, mmproj, store_mmproj)
    if vision is not None:
        v = vision.config
        if isinstance(v, UnifiedVisionConfig):
            print(f"images         encoder-free: {v.model_patch_size}x{v.model_patch_size} px patches -> "
                  f"{v.mm_embed_dim} -> text, one soft token each ({v.max_soft_tokens} per image by default); "
                  f"{count(v.parameter_count())} parameters")
        elif isinstance(v, VisionConfig):
            print(f"images         vision tower: {v.num_hidden_layers} layers, hidden {v.hidden_size}, "
                  f"{v.patch_size} px patches pooled {v.pooling_kernel_size}x{v.pooling_kernel_size} "
                  f"({v.max_soft_tokens} soft tokens per image by default); {count(_parameters(VisionModel, v))} parameters")
    if audio is not None:
        a = audio.config
        if isinstance(a, WaveformAudioConfig):
            ms = 1000 * a.audio_samples_per_token // a.sampling_rate
            print(f"audio          raw waveform: {a.audio_samples_per_token} samples ({ms} ms at {a.sampling_rate} "
                  f"Hz) per soft token; {count(a.parameter_count())} parameters")
        elif isinstance(a, AudioConfig):
            print(f"audio tower    {a.num_hidden_layers} conformer layers, hidden {a.hidden_size}, "
                  f"{count(_parameters(AudioModel, a))} parameters; clips up to 30 s, one soft token per 40 ms")
