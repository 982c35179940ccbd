"""The public Python API: load() and Model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence as Seq

import torch

from .checkpoint import open_checkpoint
from .config import ModelConfig
from .engine import PREFILL_CHUNK, Sequence, StepOutput, generate, prefill, soft_embeds
from .errors import ModelLoadError
from .model.load import build_decoder
from .multimodal import MultimodalPrompt
from .sampling import SamplingParams

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


@dataclass
class ChatReply:
    """A chat answer: the visible content, the thought channel (Gemma 4), and tool calls."""

    content: str
    reasoning: str | None
    tool_calls: list
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


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


def load(path: str | Path, dtype="float32", device="cpu", progress: bool = True,
         mmproj: str | Path | None = None, quantize: str | None = None) -> "Model":
    """Load a model from an HF checkpoint folder or a GGUF file. An HF multimodal checkpoint brings its
    vision tower; a GGUF model takes it from a llama.cpp mmproj file (`mmproj`). The tower is built
    the first time an image comes.

    GGUF weights stay in their quantised form; `quantize` ("int4" or "int8") quantises float weights.
    """
    checkpoint = open_checkpoint(path)
    tokenizer = checkpoint.load_tokenizer()  # before the weights: a missing tokenizer fails fast
    vision = _vision_checkpoint(checkpoint, mmproj)  # before the weights too: a bad mmproj fails fast
    decoder = build_decoder(checkpoint, _dtype(dtype), _device(device), progress=progress, quantize=quantize)
    _prepare_kernels(decoder)
    return Model(decoder, tokenizer, checkpoint, vision=vision)


def _prepare_kernels(decoder) -> None:
    """Quantised weights on the CPU: the native kernel is built now (once per machine, about a minute,
    then cached), at load and not inside the first request."""
    from .quant.modules import QuantParam

    if decoder.device.type == "cpu" and any(isinstance(m, QuantParam) for m in decoder.modules()):
        from .native import compiled

        compiled()


def _vision_checkpoint(checkpoint, mmproj):
    from .checkpoint.vision import HFVisionCheckpoint, MmprojCheckpoint

    config = checkpoint.config
    if mmproj is not None:
        if config.architecture != "gemma4":
            raise ModelLoadError(f"mmproj: a {config.architecture} model takes no Gemma 4 vision tower")
        vision = MmprojCheckpoint(mmproj, config.hidden_size)
        if getattr(checkpoint, "metadata", None) is not None:
            # A GGUF does not say how image tokens attend; llama.cpp's rule: both ways, except on the
            # small models (hidden 1536 and 2560: E2B, E4B), as their HF configs say too.
            config.use_bidirectional_attention = None if config.hidden_size in (1536, 2560) else "vision"
        return vision
    raw = getattr(checkpoint, "raw_config", None) or {}
    if config.architecture == "gemma4" and isinstance(raw.get("vision_config"), dict) and hasattr(checkpoint, "files"):
        return HFVisionCheckpoint(checkpoint)
    return None


class Model:
    def __init__(self, decoder, tokenizer, checkpoint=None, vision=None):
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.checkpoint = checkpoint
        self.vision_checkpoint = vision  # a reader (checkpoint/vision.py); the tower is built on first use
        self._vision = None
        self._encoded: dict = {}  # image digest -> embeddings, the last few (multimodal.encode)

    @property
    def config(self) -> ModelConfig:
        return self.decoder.config

    @property
    def eos_token_ids(self) -> set[int]:
        ids = set(self.config.eos_token_ids)
        if self.tokenizer is not None:
            ids |= set(self.tokenizer.stop_token_ids)
        return ids

    # ---- images -------------------------------------------------------------------------
    @property
    def vision(self):
        """The vision tower (model/vision.py), built from its checkpoint the first time it is asked for."""
        if self._vision is None:
            self.check_vision()
            from .model.vision import load_vision

            self._vision = load_vision(self.vision_checkpoint, self.decoder.dtype, self.decoder.device)
        return self._vision

    def check_vision(self) -> None:
        """Raises ValueError, saying why, when the model cannot take images."""
        if self.vision_checkpoint is None:
            raise ValueError("this model has no vision tower: images need a multimodal checkpoint, or an "
                             "mmproj file beside a GGUF model")

    def multimodal_prompt(self, text: str, media: list, image_tokens: int | None = None) -> MultimodalPrompt:
        """Prompt text with <|image|> / <|video|> placeholders (as the chat template writes them) and the
        images / videos for them, in order -> token ids with soft-token runs."""
        from .config import SUPPORTED_SOFT_TOKENS
        from .multimodal import MediaTokens, expand

        self.check_vision()
        cfg = self.vision_checkpoint.config
        image_tokens = cfg.max_soft_tokens if image_tokens is None else int(image_tokens)
        if image_tokens not in SUPPORTED_SOFT_TOKENS:
            raise ValueError(f"image_tokens: {image_tokens} is not one of {SUPPORTED_SOFT_TOKENS}")
        tokens = MediaTokens.from_tokenizer(self.tokenizer, getattr(self.checkpoint, "raw_config", None))
        return expand(text, media, tokens, self.tokenizer, patch_size=cfg.patch_size,
                      pooling_kernel_size=cfg.pooling_kernel_size, image_soft_tokens=image_tokens,
                      video_soft_tokens=cfg.video_max_soft_tokens)

    def media_embeddings(self, prompt) -> list:
        """[(offset, [N, hidden] embeddings)] of a prompt's images and video frames, through the vision
        tower (an image seen recently is not encoded again); [] for a text prompt."""
        if not isinstance(prompt, MultimodalPrompt) or not prompt.patches:
            return []
        from .multimodal import encode

        return encode(prompt, self.vision, self._encoded)

    # ---- logits -------------------------------------------------------------------------
    def forward(self, token_ids, chunk: int = PREFILL_CHUNK) -> torch.Tensor:
        """float32 logits for every position: [T, vocab] for one sequence (ids or a MultimodalPrompt),
        [B, T, vocab] for a batch of equal-length id lists."""
        if isinstance(token_ids, MultimodalPrompt):
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
        if isinstance(prompt, MultimodalPrompt):
            return list(prompt.ids)
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass token ids instead of text")
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        ids = [int(t) for t in prompt]
        self._check_ids(torch.tensor(ids, dtype=torch.long))
        return ids

    def _sequences(self, prompts: list, params: SamplingParams) -> list[Sequence]:
        seqs = []
        for p in prompts:
            detok = self.tokenizer.stream() if self.tokenizer is not None else None
            seqs.append(Sequence(self._encode(p), params, self.eos_token_ids, detok, soft=self.media_embeddings(p)))
        for s in seqs:
            limit = self.config.max_position_embeddings
            if len(s.prompt_ids) + params.max_tokens > limit:
                raise ValueError(f"prompt ({len(s.prompt_ids)} tokens) + max_tokens ({params.max_tokens}) "
                                 f"exceeds the model's context of {limit} tokens")
        return seqs

    def generate(self, prompt_or_ids, max_tokens: int = 256, temperature: float = 1.0, top_k: int = 64,
                 top_p: float = 0.95, min_p: float = 0.0, seed: int | None = None,
                 stop: str | list[str] | None = None, stop_token_ids: Seq[int] = (), ignore_eos: bool = False,
                 stream: bool = False, progress=None, prompt_cache=None, speculative: int = 0, drafter=None):
        """Complete a prompt (text, without any chat template, token ids, or a MultimodalPrompt), or a batch
        of them.

        Returns a Completion (a list of them for a batch), or with stream=True an iterator of
        StepOutput (index = position in the batch, text = new text safe to show).
        progress(done, total) follows the prefill; prompt_cache (a kv.files.PromptCache, one
        prompt only) reuses or saves the prompt's first tokens' KV on disk.
        """
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                min_p=min_p, seed=seed, stop=list(stop or []) if not isinstance(stop, str) else [stop],
                                stop_token_ids=list(stop_token_ids), ignore_eos=ignore_eos)
        batch = _is_batch(prompt_or_ids)
        prompts = list(prompt_or_ids) if batch else [prompt_or_ids]
        if not prompts:
            raise ValueError("no prompt given")
        seqs = self._sequences(prompts, params)
        pad = self.config.pad_token_id or 0
        run = dict(progress=progress, prompt_cache=prompt_cache, speculative=speculative, drafter=drafter)
        if stream:
            return self._stream(seqs, pad, run)
        for _ in generate(self.decoder, seqs, pad_id=pad, **run):
            pass
        results = [Completion(s.text, s.output_ids, s.finish_reason, len(s.prompt_ids),
                              *((s.speculation.drafted, s.speculation.accepted) if s.speculation else ()))
                   for s in seqs]
        return results if batch else results[0]

    def _stream(self, seqs: list[Sequence], pad: int, run: dict) -> Iterator[StepOutput]:
        for step in generate(self.decoder, seqs, pad_id=pad, **run):
            yield from step

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
        """The token ids of a conversation (a MultimodalPrompt when it holds images or videos: content
        parts {"type": "image_url", "image_url": {"url": "data:..."}}, {"type": "image", "image": PATH |
        bytes | Image}, {"type": "video", "video": PATH}). `suffix` is text the answer is made to start
        with (after the generation prompt). local_files=False (for requests from a network) refuses
        paths: a string is then only a data: URL."""
        from .multimodal import collect_media, has_media

        media = []
        if has_media(messages):
            self.check_vision()
            messages, media = collect_media(messages, local_files)
        prompt = self.chat_prompt(messages, tools=tools, enable_thinking=enable_thinking, **template_kwargs) + suffix
        if media:
            return self.multimodal_prompt(prompt, media, image_tokens)
        return self.tokenizer.encode(prompt, add_special_tokens=False)  # the template writes BOS itself

    def chat(self, messages: list[dict], *, tools: list | None = None, enable_thinking: bool = False,
             stream: bool = False, image_tokens: int | None = None, local_files: bool = True, **sampling):
        """Answer a conversation (OpenAI-style messages, images and videos among the content parts) through
        the chat template; `image_tokens` caps the soft tokens per image (70, 140, 280, 560 or 1120).

        Returns a ChatReply, or with stream=True an iterator of chat.StreamEvent (content, reasoning
        and tool-call events)."""
        from .chat import parse_output

        ids = self.chat_input(messages, tools=tools, enable_thinking=enable_thinking, image_tokens=image_tokens,
                              local_files=local_files)
        if stream:
            return self._chat_stream(ids, sampling)
        out = self.generate(ids, **sampling)
        parsed = parse_output(out.text, self.config.architecture)
        return ChatReply(parsed.content, parsed.reasoning, parsed.tool_calls,
                         "tool_calls" if parsed.tool_calls else out.finish_reason,
                         out.prompt_tokens, len(out.token_ids))

    def _chat_stream(self, ids: list[int], sampling: dict):
        from .chat import output_parser

        parser = output_parser(self.config.architecture)
        for chunk in self.generate(ids, stream=True, **sampling):
            yield from parser.feed(chunk.text)
        yield from parser.finish()


def _is_batch(x) -> bool:
    if isinstance(x, (str, MultimodalPrompt)):
        return False
    if isinstance(x, torch.Tensor):
        return x.dim() == 2
    x = list(x) if not isinstance(x, list) else x
    return bool(x) and not isinstance(x[0], (int,)) and not (isinstance(x[0], torch.Tensor) and x[0].dim() == 0)
