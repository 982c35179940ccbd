"""The public Python API: load() and Model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence as Seq

import torch

from .checkpoint import open_checkpoint
from .config import ModelConfig
from .engine import PREFILL_CHUNK, Sequence, StepOutput, generate, prefill
from .errors import ModelLoadError
from .model.load import build_decoder
from .sampling import SamplingParams

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int


@dataclass
class ChatReply:
    """A chat answer: the visible content, the thought channel (Gemma 4), and tool calls."""

    content: str
    reasoning: str | None
    tool_calls: list
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class ChatDelta:
    kind: str  # "content", "reasoning" or "tool_call"
    text: str = ""
    tool_call: object = None


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
         quantize: str | None = None) -> "Model":
    """Load a model from an HF checkpoint folder or a GGUF file.

    GGUF weights stay in their quantised form; `quantize` ("int4" or "int8") quantises float weights.
    """
    checkpoint = open_checkpoint(path)
    tokenizer = checkpoint.load_tokenizer()  # before the weights: a missing tokenizer fails fast
    decoder = build_decoder(checkpoint, _dtype(dtype), _device(device), progress=progress, quantize=quantize)
    return Model(decoder, tokenizer, checkpoint)


class Model:
    def __init__(self, decoder, tokenizer, checkpoint=None):
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.checkpoint = checkpoint

    @property
    def config(self) -> ModelConfig:
        return self.decoder.config

    @property
    def eos_token_ids(self) -> set[int]:
        ids = set(self.config.eos_token_ids)
        if self.tokenizer is not None:
            ids |= set(self.tokenizer.stop_token_ids)
        return ids

    # ---- logits -------------------------------------------------------------------------
    def forward(self, token_ids, chunk: int = PREFILL_CHUNK) -> torch.Tensor:
        """float32 logits for every position: [T, vocab] for one sequence, [B, T, vocab] for a batch."""
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

    def _check_ids(self, ids: torch.Tensor) -> None:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise ValueError(f"token id out of range [0, {self.config.vocab_size})")

    # ---- generation ---------------------------------------------------------------------
    def _encode(self, prompt) -> list[int]:
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
            seqs.append(Sequence(self._encode(p), params, self.eos_token_ids, detok))
        for s in seqs:
            limit = self.config.max_position_embeddings
            if len(s.prompt_ids) + params.max_tokens > limit:
                raise ValueError(f"prompt ({len(s.prompt_ids)} tokens) + max_tokens ({params.max_tokens}) "
                                 f"exceeds the model's context of {limit} tokens")
        return seqs

    def generate(self, prompt_or_ids, max_tokens: int = 256, temperature: float = 1.0, top_k: int = 64,
                 top_p: float = 0.95, min_p: float = 0.0, seed: int | None = None,
                 stop: str | list[str] | None = None, stop_token_ids: Seq[int] = (), ignore_eos: bool = False,
                 stream: bool = False):
        """Complete a prompt (text, without any chat template, or token ids), or a batch of them.

        Returns a Completion (a list of them for a batch), or with stream=True an iterator of
        StepOutput (index = position in the batch, text = new text safe to show).
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
        if stream:
            return self._stream(seqs, pad)
        for _ in generate(self.decoder, seqs, pad_id=pad):
            pass
        results = [Completion(s.text, s.output_ids, s.finish_reason, len(s.prompt_ids)) for s in seqs]
        return results if batch else results[0]

    def _stream(self, seqs: list[Sequence], pad: int) -> Iterator[StepOutput]:
        for step in generate(self.decoder, seqs, pad_id=pad):
            yield from step

    # ---- chat ---------------------------------------------------------------------------
    @property
    def chat_template(self) -> str | None:
        """The model's own chat template, or None (then chat uses the family's turn format)."""
        get = getattr(self.checkpoint, "chat_template", None)
        return get() if get is not None else None

    def chat_prompt(self, messages: list[dict], tools: list | None = None, enable_thinking: bool = False,
                    add_generation_prompt: bool = True) -> str:
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
                           enable_thinking=enable_thinking)

    def chat(self, messages: list[dict], *, tools: list | None = None, enable_thinking: bool = False,
             stream: bool = False, **sampling):
        """Answer a conversation (OpenAI-style messages) through the chat template.

        Returns a ChatReply, or with stream=True an iterator of ChatDelta."""
        prompt = self.chat_prompt(messages, tools=tools, enable_thinking=enable_thinking)
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)  # the template writes BOS itself
        if stream:
            return self._chat_stream(ids, sampling)
        out = self.generate(ids, **sampling)
        if self.config.architecture == "gemma4":
            from .chat import parse_gemma4_output

            parsed = parse_gemma4_output(out.text)
            content, reasoning, calls = parsed.content, parsed.reasoning, parsed.tool_calls
        else:
            content, reasoning, calls = out.text, None, []
        return ChatReply(content, reasoning, calls, "tool_calls" if calls else out.finish_reason,
                         out.prompt_tokens, len(out.token_ids))

    def _chat_stream(self, ids: list[int], sampling: dict) -> Iterator[ChatDelta]:
        if self.config.architecture != "gemma4":
            for chunk in self.generate(ids, stream=True, **sampling):
                if chunk.text:
                    yield ChatDelta("content", chunk.text)
            return
        from .chat import Gemma4StreamParser

        parser = Gemma4StreamParser()
        for chunk in self.generate(ids, stream=True, **sampling):
            yield from _deltas(parser.feed(chunk.text))
        yield from _deltas(parser.finish())


def _deltas(events) -> Iterator[ChatDelta]:
    for event in events:
        kind = getattr(event, "kind", None)
        if kind == "tool_call":
            yield ChatDelta("tool_call", tool_call=event.tool_call)
        elif getattr(event, "text", ""):
            yield ChatDelta(kind, event.text)


def _is_batch(x) -> bool:
    if isinstance(x, str):
        return False
    if isinstance(x, torch.Tensor):
        return x.dim() == 2
    x = list(x) if not isinstance(x, list) else x
    return bool(x) and not isinstance(x[0], (int,)) and not (isinstance(x[0], torch.Tensor) and x[0].dim() == 0)
