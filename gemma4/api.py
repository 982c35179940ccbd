"""The public Python API: load() and Model.

A Model keeps one engine (engine/), stepped on the caller's thread by generate() and chat(): its prefix store
persists across calls, so a second prompt over the same long document prefills only what follows the part
already computed. forward() is a direct full forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
import sys
from typing import TYPE_CHECKING, Iterator, Sequence as Seq

import torch

from .checkpoint import open_checkpoint
from .config.text import ModelConfig
from .engine import PREFILL_CHUNK, Engine, Request, StepOutput, TokenLogprob, prefill, soft_embeds
from .errors import ModelLoadError
from .model.load import build_decoder
from .sampling import SamplingParams
from .speculative.verify import MAX_DRAFT

if TYPE_CHECKING:
    from .multimodal import MultimodalPrompt
    from .store import StoredModel

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    drafted_tokens: int = 0  # speculative decoding: tokens drafted, and how many of them were kept
    accepted_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV was reused (prefix store or prompt-cache file)
    logprobs: list[TokenLogprob] | None = None  # with logprobs=k: one per output token


@dataclass
class ChatReply:
    """A chat answer: the visible content, the thought channel (Gemma 4), and tool calls."""

    content: str
    reasoning: str | None
    tool_calls: list
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None


def _multimodal(x) -> bool:
    """x is a MultimodalPrompt (none exists before gemma4.multimodal is imported: a text run never loads it)."""
    module = sys.modules.get(f"{__package__}.multimodal")
    return module is not None and isinstance(x, module.MultimodalPrompt)


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"dtype: unsupported {dtype!r} (use float32 or bfloat16)") from None


def _device(device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: CUDA was asked for but no CUDA device is available")
    return device


def load(path: str | Path | StoredModel | None = None, dtype="float32", device="cpu", progress: bool = True,
         mmproj: str | Path | None = None, quantize: str | None = None, *, kv_cache: str = "float",
         kv_budget: int | str | None = None, prefix_cache_bytes: int | str = "2GiB", max_batch: int = 8,
         max_memory: int | str | None = None, tensor_parallel: int = 1, expert_parallel: int = 1) -> "Model":
    """Load a model from an HF checkpoint folder or a GGUF file (None: the embedded model), or a name in a
    store (`gemma3:270m`, `ORG/NAME:Q4_K_M`, `hf://…`: see store.find). An HF multimodal checkpoint brings
    its vision tower; a GGUF model takes it from a llama.cpp mmproj file (`mmproj`, else the one its store
    keeps beside it). The tower is built the first time an image comes.

    GGUF weights stay in their quantised form; `quantize` ("int4" or "int8") quantises float weights.
    The engine's settings, as `gemma4 serve` takes them: kv_cache ("float" or "int8"), kv_budget (bytes of KV
    for running sequences, e.g. "8GiB"; None: unbounded), prefix_cache_bytes (memory for reuse of prompt
    prefixes across calls; 0: off), max_batch (prompts decoded together).
    max_memory (bytes, e.g. "8GiB"; MoE models): the weights held in memory, the dense parts and the most used
    routed experts; the other experts are read from the mapped file when routed to (model/residency.py).

    tensor_parallel / expert_parallel N (1 or the same N): the model split over N ranks (gemma4.distributed):
    attention heads, dense MLP and vocabulary split (tensor), routed experts split (both). This process is rank
    0 and starts the others on this machine; under torchrun each process is its RANK, and the ranks other than
    0 follow rank 0 inside load() and exit when it does (they never return).
    """
    found = _found(path)
    engine = _engine_options(kv_cache, kv_budget, prefix_cache_bytes, max_batch)
    budget = _max_memory(max_memory)
    checkpoint = open_checkpoint(found.path)
    tokenizer = checkpoint.load_tokenizer()  # before the weights: a missing tokenizer fails fast
    vision, audio = media_readers(checkpoint, mmproj, found.mmproj)  # before the weights: a bad mmproj fails fast
    if tensor_parallel != 1 or expert_parallel != 1:
        if budget is not None:
            raise ValueError("max_memory: not with a model split over ranks (each rank holds its share already)")
        from .distributed import load_decoder

        args = dict(path=str(found.path), dtype=str(_dtype(dtype)).removeprefix("torch."), quantize=quantize)
        decoder = load_decoder(checkpoint, args, _dtype(dtype), _device(device), progress, tensor_parallel,
                               expert_parallel)
    else:
        decoder = build_decoder(checkpoint, _dtype(dtype), _device(device), progress=progress, quantize=quantize)
    if audio is not None:
        decoder.config.audio_token_id = _audio_token_id(checkpoint, tokenizer)
    _prepare_kernels(decoder)
    if budget is not None:
        from .model.residency import attach

        attach(decoder, budget)
    return Model(decoder, tokenizer, checkpoint, vision=vision, engine_options=engine, audio=audio)


def _found(path):
    """A load() path as the store finds it: a path, a store name, the embedded model (None), or a store.StoredModel."""
    from .store import StoredModel, find

    if isinstance(path, StoredModel):
        return path
    return find(None if path is None else str(path))


def _store_projector(checkpoint, path):
    """The readers of a projector a store keeps beside the model, where it is one this engine reads (gemma4v /
    gemma4a, the 12B's gemma4uv / gemma4ua; another family's is not): else (None, None)."""
    try:
        return _vision_checkpoint(checkpoint, path), _audio_checkpoint(checkpoint, path)
    except ModelLoadError:
        return None, None


def _engine_options(kv_cache: str, kv_budget, prefix_cache_bytes, max_batch: int) -> dict:
    from .kv import parse_bytes

    if kv_cache not in ("float", "int8"):
        raise ValueError(f"kv_cache: {kv_cache!r} is not float or int8")
    if not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch: must be a positive integer, got {max_batch!r}")
    return dict(kv_cache=kv_cache, kv_budget=parse_bytes(kv_budget) if kv_budget is not None else None,
                prefix_cache_bytes=parse_bytes(prefix_cache_bytes), max_batch=max_batch)


def _max_memory(max_memory) -> int | None:
    from .kv import parse_bytes

    if max_memory is None:
        return None
    try:
        budget = parse_bytes(max_memory)
    except ValueError as e:
        raise ValueError(f"max_memory: {e}") from None
    if budget <= 0:
        raise ValueError(f"max_memory: must be positive, got {max_memory!r}")
    return budget


def _prepare_kernels(decoder) -> None:
    """Quantised weights on the CPU: the native kernel is built now (once per machine, about a minute,
    then cached), at load and not inside the first request."""
    from .quant.modules import QuantParam

    if decoder.device.type == "cpu" and any(isinstance(m, QuantParam) for m in decoder.modules()):
        from .native import compiled

        compiled()


def media_readers(checkpoint, mmproj=None, store_mmproj=None):
    """The readers of a model's image and audio parts (None where it has none): its HF folder's own, else those of
    the mmproj file given (a bad one is an error), else of the one its store keeps beside it (skipped where this
    engine does not read it)."""
    vision, audio = _vision_checkpoint(checkpoint, mmproj), _audio_checkpoint(checkpoint, mmproj)
    if mmproj is None and store_mmproj is not None:
        from_store = _store_projector(checkpoint, store_mmproj)
        vision = vision if vision is not None else from_store[0]
        audio = audio if audio is not None else from_store[1]
    return vision, audio


def _vision_checkpoint(checkpoint, mmproj):
    from .checkpoint.vision import HFVisionCheckpoint, MmprojCheckpoint

    config = checkpoint.config
    if mmproj is not None:
        if config.architecture != "gemma4":
            raise ModelLoadError(f"mmproj: a {config.architecture} model takes no Gemma 4 vision tower")
        from .checkpoint import unified_mmproj

        if unified_mmproj.projector_types(mmproj)[0] == unified_mmproj.VISION_PROJECTOR:
            # the 12B unified model's: its image runs see one another both ways on every layer (the reference's
            # mask; llama.cpp's gemma4 graph keeps them to the sliding layers)
            config.use_bidirectional_attention, config.bidirectional_vision_layers = "vision", "all"
            return unified_mmproj.MmprojUnifiedVisionCheckpoint(mmproj, config.hidden_size)
        vision = MmprojCheckpoint(mmproj, config.hidden_size)
        if getattr(checkpoint, "metadata", None) is not None:
            # A GGUF does not say how image tokens attend; llama.cpp's rule: both ways, except on the
            # small models (hidden 1536 and 2560: E2B, E4B), as their HF configs say too.
            config.use_bidirectional_attention = None if config.hidden_size in (1536, 2560) else "vision"
        return vision
    raw = getattr(checkpoint, "raw_config", None) or {}
    if config.model_type == "gemma4_unified":
        from .checkpoint.unified import unified_media

        return unified_media(checkpoint)[0]
    if config.architecture == "gemma4" and isinstance(raw.get("vision_config"), dict) and hasattr(checkpoint, "files"):
        return HFVisionCheckpoint(checkpoint)
    return None


def _audio_checkpoint(checkpoint, mmproj):
    """The audio tower's reader: the HF folder's own, or the mmproj's gemma4a part (None where neither has one);
    for the unified model, its waveform embedder's (checkpoint/unified.py)."""
    from .checkpoint.audio import HFAudioCheckpoint, MmprojAudioCheckpoint

    config = checkpoint.config
    if config.model_type == "gemma4_unified":
        from .checkpoint.unified import unified_media

        return unified_media(checkpoint)[1]
    if mmproj is not None:
        from .checkpoint import unified_mmproj

        projector = unified_mmproj.projector_types(mmproj)[1] if config.architecture == "gemma4" else None
        if projector == unified_mmproj.AUDIO_PROJECTOR:
            return unified_mmproj.MmprojWaveformAudioCheckpoint(mmproj, config.hidden_size)
        return MmprojAudioCheckpoint(mmproj, config.hidden_size) if projector else None
    raw = getattr(checkpoint, "raw_config", None) or {}
    if config.architecture == "gemma4" and isinstance(raw.get("audio_config"), dict) and hasattr(checkpoint, "files"):
        return HFAudioCheckpoint(checkpoint)
    return None


def _audio_token_id(checkpoint, tokenizer) -> int | None:
    from .multimodal import AUDIO

    raw = getattr(checkpoint, "raw_config", None) or {}
    if raw.get("audio_token_id") is not None:
        return int(raw["audio_token_id"])
    return tokenizer.token_to_id(AUDIO) if tokenizer is not None else None


class Model:
    def __init__(self, decoder, tokenizer, checkpoint=None, vision=None, engine_options: dict | None = None,
                 audio=None):
        self.decoder = decoder
        self.engine_options = engine_options or _engine_options("float", None, "2GiB", 8)
        self._engine: Engine | None = None
        self.tokenizer = tokenizer
        self.checkpoint = checkpoint
        self.vision_checkpoint = vision  # a reader (checkpoint/vision.py); the tower is built on first use
        self._vision = None
        self.audio_checkpoint = audio  # a reader (checkpoint/audio.py, or unified.py's waveform embedder)
        self._audio = None
        self._encoded: dict = {}  # image digest -> embeddings, the last few (multimodal.encode)

    @property
    def engine(self) -> Engine:
        """The engine generate() and chat() step (built at first use; its prefix store lives as long as the model)."""
        return self.engine_for(1)

    def engine_for(self, prompts: int) -> Engine:
        """The engine, with a row for each of `prompts` run together (up to max_batch). Each row holds a
        sliding window of KV per sliding layer, so a model used one prompt at a time keeps one row; a
        wider batch builds a wider engine, which takes over the prefix store."""
        o = self.engine_options
        rows = min(o["max_batch"], max(1, prompts))
        if self._engine is None or self._engine.max_batch < rows:
            if self._engine is not None:
                store = self._engine.prefix_store
            else:
                from .kv import PrefixStore

                store = PrefixStore(o["prefix_cache_bytes"]) if o["prefix_cache_bytes"] else None
            # rings with room for the longest draft: any call may speculate (decode bits do not depend on it)
            self._engine = Engine(self, max_batch=rows, max_queue=rows, prefix_store=store,
                                  ring_tail=MAX_DRAFT, kv_budget=o["kv_budget"], kv_dtype=o["kv_cache"])
        return self._engine

    def load_like(self, path: str | Path, **load_kwargs) -> "Model":
        """Another model (a draft model) on this one's dtype and device."""
        return load(path, dtype=self.decoder.dtype, device=self.decoder.device, progress=False, **load_kwargs)

    @property
    def config(self) -> ModelConfig:
        return self.decoder.config

    @property
    def eos_token_ids(self) -> set[int]:
        ids = set(self.config.eos_token_ids)
        if self.tokenizer is not None:
            ids |= set(self.tokenizer.stop_token_ids)
        return ids

    @property
    def thought_tokens(self) -> tuple[int, list[int]] | None:
        """(the id that opens a thought channel, the ids that close one as the chat template writes the
        close: a newline, then `<channel|>`), or None for a vocabulary without thought channels."""
        from .chat import CHANNEL_CLOSE, CHANNEL_OPEN

        tok = self.tokenizer
        if tok is None or self.config.architecture != "gemma4":
            return None
        open_id, close_id = tok.token_to_id(CHANNEL_OPEN), tok.token_to_id(CHANNEL_CLOSE)
        if open_id is None or close_id is None:
            return None
        return open_id, tok.encode("\n", add_special_tokens=False) + [close_id]

    # ---- images -------------------------------------------------------------------------
    @property
    def vision(self):
        """The vision tower (model/vision.py), built from its checkpoint the first time it is asked for."""
        if self._vision is None:
            self.check_vision()
            from .config.unified import UnifiedVisionConfig
            from .model.unified import load_embedder
            from .model.vision import load_vision

            build = load_embedder if isinstance(self.vision_checkpoint.config, UnifiedVisionConfig) else load_vision
            self._vision = build(self.vision_checkpoint, self.decoder.dtype, self.decoder.device)
        return self._vision

    def check_vision(self) -> None:
        """Raises ValueError, saying why, when the model cannot take images."""
        if self.vision_checkpoint is None:
            raise ValueError("this model has no vision tower: images need a multimodal checkpoint, or an "
                             "mmproj file beside a GGUF model")

    # ---- audio --------------------------------------------------------------------------
    @property
    def audio(self):
        """The audio tower (model/audio.py), built from its checkpoint the first time it is asked for."""
        if self._audio is None:
            self.check_audio()
            from .config.unified import WaveformAudioConfig
            from .model.audio import load_audio_tower
            from .model.unified import load_embedder

            unified = isinstance(self.audio_checkpoint.config, WaveformAudioConfig)  # (HF folder or mmproj)
            self._audio = (load_embedder if unified else load_audio_tower)(self.audio_checkpoint, self.decoder.dtype,
                                                                           self.decoder.device)
        return self._audio

    def check_audio(self) -> None:
        """Raises ValueError, saying why, when the model cannot take audio."""
        if self.audio_checkpoint is None:
            raise ValueError("this model has no audio tower: audio needs a Gemma 4 model with one (E2B, E4B), or "
                             "its mmproj file beside a GGUF model")

    def check_media(self, media: list | None = None, kinds: set[str] | None = None) -> None:
        """Raises ValueError when the model lacks a tower that `media` (or the tower `kinds`) need."""
        from .multimodal import media_kinds

        kinds = media_kinds(media or []) | (kinds or set())
        if "vision" in kinds:
            self.check_vision()
        if "audio" in kinds:
            self.check_audio()

    def multimodal_prompt(self, text: str, media: list, image_tokens: int | None = None) -> MultimodalPrompt:
        """Prompt text with <|image|> / <|video|> / <|audio|> placeholders (as the chat template writes them)
        and the images / videos / audio clips for them, in order -> token ids with soft-token runs."""
        from .audio_features import FeatureExtractor
        from .config.unified import WaveformAudioConfig
        from .config.vision import SUPPORTED_SOFT_TOKENS
        from .multimodal import MediaTokens, expand, waveform_frames

        self.check_media(media)
        sizes = {}
        if self.vision_checkpoint is not None:
            cfg = self.vision_checkpoint.config
            image_tokens = cfg.max_soft_tokens if image_tokens is None else int(image_tokens)
            if image_tokens not in SUPPORTED_SOFT_TOKENS:
                raise ValueError(f"image_tokens: {image_tokens} is not one of {SUPPORTED_SOFT_TOKENS}")
            sizes = dict(patch_size=cfg.preprocess_patch_size,
                         pooling_kernel_size=cfg.preprocess_pooling,
                         image_soft_tokens=image_tokens, video_soft_tokens=cfg.video_max_soft_tokens)
        if self.audio_checkpoint is not None and isinstance(self.audio_checkpoint.config, WaveformAudioConfig):
            # raw 16 kHz frames, no log-mel
            a = self.audio_checkpoint.config
            sizes["audio_frames"] = lambda clip: waveform_frames(clip, a.audio_samples_per_token, a.sampling_rate)
        elif self.audio_checkpoint is not None:
            sizes.update(audio_extractor=FeatureExtractor(self.audio_checkpoint.features),
                         audio_seq_length=self.audio_checkpoint.config.audio_seq_length)
        tokens = MediaTokens.from_tokenizer(self.tokenizer, getattr(self.checkpoint, "raw_config", None))
        return expand(text, media, tokens, self.tokenizer, **sizes)

    def media_embeddings(self, prompt) -> list:
        """[(offset, [N, hidden] embeddings)] of a prompt's images, video frames and audio clips, through
        their towers (media seen recently are not encoded again); [] for a text prompt."""
        if not _multimodal(prompt) or not prompt.patches:
            return []
        from .multimodal import encode

        return encode(prompt, lambda: self.vision, self._encoded, audio=lambda: self.audio)

    # ---- logits -------------------------------------------------------------------------
    def forward(self, token_ids, chunk: int = PREFILL_CHUNK) -> torch.Tensor:
        """float32 logits for every position: [T, vocab] for one sequence (ids or a MultimodalPrompt),
        [B, T, vocab] for a batch of equal-length id lists."""
        if _multimodal(token_ids):
            return self._forward_multimodal(token_ids, chunk)
        ids = torch.as_tensor(token_ids, dtype=torch.long)
        single = ids.dim() == 1
        if single:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError("token_ids must be a non-empty sequence of ids or a batch of equal-length ones")
        self._check_ids(ids)
        ids = ids.to(self.decoder.device)
        pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        cache = self.decoder.new_cache(batch=ids.shape[0], capacity=ids.shape[1])
        out = []
        prefill(self.decoder, cache, ids, pos, chunk, on_hidden=lambda _, h: out.append(self.decoder.logits(h)))
        logits = torch.cat(out, dim=1)
        return logits[0] if single else logits

    def _forward_multimodal(self, prompt: MultimodalPrompt, chunk: int) -> torch.Tensor:
        ids = torch.tensor([prompt.ids], dtype=torch.long, device=self.decoder.device)
        pos = torch.arange(ids.shape[1], device=ids.device)[None]
        embeds, mask = soft_embeds([(ids.shape[1], self.media_embeddings(prompt))], ids.shape[1], self.config.hidden_size,
                                   self.decoder.dtype, ids.device)
        cache = self.decoder.new_cache(batch=1, capacity=ids.shape[1])
        out = []
        prefill(self.decoder, cache, ids, pos, chunk, on_hidden=lambda _, h: out.append(self.decoder.logits(h)),
                embeds=embeds, embeds_mask=mask)
        return torch.cat(out, dim=1)[0]

    def _check_ids(self, ids: torch.Tensor) -> None:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise ValueError(f"token id out of range [0, {self.config.vocab_size})")

    # ---- generation ---------------------------------------------------------------------
    def _encode(self, prompt) -> list[int]:
        if _multimodal(prompt):
            return list(prompt.ids)
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass token ids instead of text")
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        ids = [int(t) for t in prompt]
        self._check_ids(torch.tensor(ids, dtype=torch.long))
        return ids

    def _requests(self, prompts: list, params: SamplingParams, logprobs: int | None, response_format,
                  speculative: int, drafter, prompt_cache, progress) -> list[Request]:
        if prompt_cache is not None and len(prompts) != 1:
            raise ValueError("a prompt cache serves one prompt at a time")
        if logprobs is not None and (not isinstance(logprobs, int) or logprobs < 0):
            raise ValueError(f"logprobs: the number of most likely tokens to report (0 or more), got {logprobs!r}")
        if speculative and drafter is None:
            from .speculative import PromptLookup

            drafter = PromptLookup()
        requests = []
        limit = self.config.max_position_embeddings
        for p in prompts:
            ids = self._encode(p)
            if not ids:
                raise ValueError("empty prompt: at least one token is needed")
            if len(ids) + params.max_tokens > limit:
                raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) "
                                 f"exceeds the model's context of {limit} tokens")
            if params.stop and self.tokenizer is None:
                raise ValueError("stop strings need a tokenizer")
            if params.thinking_budget is not None and self.thought_tokens is None:
                raise ValueError(f"thinking_budget: this model ({self.config.architecture}) has no thought channel")
            constraint = None
            if response_format is not None:
                if self.tokenizer is None:
                    raise ValueError("response_format: needs the model's tokenizer")
                from .structured import constraint_from_response_format  # llguidance: only when asked for

                constraint = constraint_from_response_format(response_format, self.tokenizer)
            requests.append(Request(ids, params, logprobs=logprobs, constraint=constraint,
                                    soft=self.media_embeddings(p), speculative=speculative, drafter=drafter,
                                    prompt_cache=prompt_cache, progress=progress))
        return requests

    def generate(self, prompt_or_ids, max_tokens: int = 256, temperature: float = 1.0, top_k: int = 64,
                 top_p: float = 0.95, min_p: float = 0.0, seed: int | None = None,
                 stop: str | list[str] | None = None, stop_token_ids: Seq[int] = (), ignore_eos: bool = False,
                 stream: bool = False, progress=None, prompt_cache=None, speculative: int = 0, drafter=None,
                 logprobs: int | None = None, response_format: dict | None = None,
                 thinking_budget: int | None = None):
        """Complete a prompt (text, without any chat template, token ids, or a MultimodalPrompt), or a batch
        of them, through the model's engine (a prompt sharing a stored prefix with an earlier one resumes
        after it: Completion.cached_tokens).

        Returns a Completion (a list of them for a batch), or with stream=True an iterator of
        StepOutput (index = position in the batch, text = new text safe to show).
        progress(done, total) follows the prefill; prompt_cache (an engine.prompt_cache.PromptCache, one
        prompt only) reuses or saves the prompt's first tokens' KV on disk.
        As the server takes them: logprobs=k reports each output token's logprob and the k most likely;
        response_format ({"type": "json_schema", "json_schema": {"schema": ...}} or {"type": "json_object"})
        constrains the output; speculative=K drafts up to K tokens per step with `drafter` (default:
        speculative.PromptLookup()); thinking_budget=N closes a thought channel the model opens after N
        tokens (None: unbounded; Gemma 4).
        """
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                min_p=min_p, seed=seed, stop=list(stop or []) if not isinstance(stop, str) else [stop],
                                stop_token_ids=list(stop_token_ids), ignore_eos=ignore_eos,
                                thinking_budget=thinking_budget)
        batch = _is_batch(prompt_or_ids)
        prompts = list(prompt_or_ids) if batch else [prompt_or_ids]
        if not prompts:
            raise ValueError("no prompt given")
        requests = self._requests(prompts, params, logprobs, response_format, speculative, drafter, prompt_cache,
                                  progress)
        outputs = self.engine_for(len(requests)).generate(requests)
        if stream:
            return _steps(outputs)
        results = [Completion("", [], "", len(r.prompt_ids), logprobs=[] if logprobs is not None else None)
                   for r in requests]
        for i, out in outputs:
            c = results[i]
            if out.finish_reason == "error":
                raise RuntimeError("the engine failed while generating")
            c.text += out.text
            if out.token_id is not None:
                c.token_ids.append(out.token_id)
            if out.logprob is not None:
                c.logprobs.append(out.logprob)
            c.finish_reason = out.finish_reason or ""
            c.cached_tokens = out.cached_tokens
            c.drafted_tokens, c.accepted_tokens = out.drafted_tokens, out.accepted_tokens
        return results if batch else results[0]

    # ---- chat ---------------------------------------------------------------------------
    @property
    def chat_template(self) -> str | None:
        """The model's own chat template, or None (then chat uses the family's turn format)."""
        get = getattr(self.checkpoint, "chat_template", None)
        return get() if get is not None else None

    def chat_prompt(self, messages: list[dict], tools: list | None = None, enable_thinking: bool = False,
                    add_generation_prompt: bool = True, **template_kwargs) -> str:
        """The prompt text of a conversation; template_kwargs reach the template as variables."""
        from .chat import render_chat

        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: chat needs one")
        if not messages:
            raise ValueError("messages: at least one message is needed")
        tok = self.tokenizer
        return render_chat(messages, template=self.chat_template, family=self.config.architecture,
                           bos_token=tok.id_to_token(tok.bos_token_id) or "",
                           eos_token=tok.id_to_token(tok.eos_token_id) or "",
                           add_generation_prompt=add_generation_prompt, tools=tools,
                           enable_thinking=enable_thinking, **template_kwargs)

    def chat_input(self, messages: list[dict], tools: list | None = None, enable_thinking: bool = False,
                   image_tokens: int | None = None, suffix: str = "", local_files: bool = True,
                   **template_kwargs):
        """The token ids of a conversation (a MultimodalPrompt when it holds images, videos or audio: content
        parts {"type": "image_url", "image_url": {"url": "data:..."}}, {"type": "image", "image": PATH |
        bytes | Image}, {"type": "video", "video": PATH}, {"type": "input_audio", "input_audio": {"data":
        BASE64, "format": "wav"}}, {"type": "audio", "audio": PATH | bytes | Audio}). `suffix` is text the answer is made to start
        with (after the generation prompt). local_files=False (for requests from a network) refuses
        paths: a string is then only a data: URL."""
        from .multimodal import collect_media, has_media, part_kinds

        media = []
        if has_media(messages):
            self.check_media(kinds=part_kinds(messages))  # before decoding: a model without the tower says so
            messages, media = collect_media(messages, local_files)
        prompt = self.chat_prompt(messages, tools=tools, enable_thinking=enable_thinking, **template_kwargs) + suffix
        if media:
            return self.multimodal_prompt(prompt, media, image_tokens)
        return self.tokenizer.encode(prompt, add_special_tokens=False)  # the template writes BOS itself

    def chat(self, messages: list[dict], *, tools: list | None = None, enable_thinking: bool | None = None,
             stream: bool = False, image_tokens: int | None = None, local_files: bool = True, **sampling):
        """Answer a conversation (OpenAI-style messages, images and videos among the content parts) through
        the chat template; `image_tokens` caps the soft tokens per image (70, 140, 280, 560 or 1120).
        thinking_budget=N (among the sampling options) bounds the thoughts to N tokens, then the model
        answers; it turns thinking on unless enable_thinking says otherwise, and 0 turns it off.

        Returns a ChatReply, or with stream=True an iterator of chat.StreamEvent (content, reasoning
        and tool-call events)."""
        from .chat import parse_output

        budget = sampling.get("thinking_budget")
        if enable_thinking is None:
            enable_thinking = bool(budget)
        elif budget == 0:
            enable_thinking = False
        ids = self.chat_input(messages, tools=tools, enable_thinking=enable_thinking, image_tokens=image_tokens,
                              local_files=local_files)
        if stream:
            return self._chat_stream(ids, sampling)
        out = self.generate(ids, **sampling)
        parsed = parse_output(out.text, self.config.architecture)
        declared = {t.get("function", t).get("name") for t in tools or [] if isinstance(t, dict)}
        called = out.finish_reason == "stop" and any(c.name in declared for c in parsed.tool_calls)
        return ChatReply(parsed.content, parsed.reasoning, parsed.tool_calls,
                         "tool_calls" if called else out.finish_reason,
                         out.prompt_tokens, len(out.token_ids), out.cached_tokens, out.logprobs)

    def _chat_stream(self, ids: list[int], sampling: dict):
        from .chat import output_parser

        parser = output_parser(self.config.architecture)
        for chunk in self.generate(ids, stream=True, **sampling):
            yield from parser.feed(chunk.text)
        yield from parser.finish()


def _steps(outputs) -> Iterator[StepOutput]:
    for i, out in outputs:
        if out.finish_reason == "error":
            raise RuntimeError("the engine failed while generating")
        yield StepOutput(i, out.token_id, out.text, out.finished, out.finish_reason, out.logprob)


def _is_batch(x) -> bool:
    if isinstance(x, str) or _multimodal(x):
        return False
    if isinstance(x, torch.Tensor):
        return x.dim() == 2
    x = list(x) if not isinstance(x, list) else x
    return bool(x) and not isinstance(x[0], (int,)) and not (isinstance(x[0], torch.Tensor) and x[0].dim() == 0)
