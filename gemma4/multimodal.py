"""Prompt assembly for images, videos and audio.

1. `collect_media(messages)`: the image, video and audio parts of OpenAI-style messages are decoded (data:
   URLs, base64 input_audio, files, Image / Audio objects) and replaced by `{"type": "image"}` /
   `{"type": "video"}` / `{"type": "audio"}` parts, which the chat template renders as the `<|image|>` /
   `<|video|>` / `<|audio|>` placeholders.
2. `expand(text, media, ...)`: as the reference processor does, each image placeholder becomes
   begin-of-image, N soft tokens, end-of-image, each video placeholder one such block per frame,
   each after its `mm:ss` timestamp, frames separated by spaces, and each audio placeholder
   begin-of-audio, one soft token per 4 valid log-mel frames, end-of-audio; then the text is tokenized.
3. `encode(prompt, vision, audio=...)`: the towers turn each block's patches or frames into N embeddings,
   which replace the soft tokens' embeddings in the decoder (engine: Sequence.soft).
   The unified model has no audio tower: each clip becomes begin-of-audio, one soft token per frame
   of raw samples (`waveform_frames`), end-of-audio; its embedder projects the frames.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from .audio_io import SAMPLING_RATE, Audio, decode_audio, decode_base64_audio, load_audio, resample
from .errors import AudioError
from .images import Image, Patches, decode_image, from_pil, image_from_url, load_image, preprocess
from .video import Video, load_video, timestamp_text

# The texts of the media tokens in Gemma 4's vocabulary (the processor's boi/eoi/image/video tokens).
BOI, EOI, IMAGE, VIDEO = "<|image>", "<image|>", "<|image|>", "<|video|>"
BOA, EOA, AUDIO = "<|audio>", "<audio|>", "<|audio|>"
MEDIA_PARTS = ("image", "image_url", "video", "audio", "input_audio")


@dataclass(frozen=True)
class MediaTokens:
    boi: str
    eoi: str
    image: str
    video: str
    image_id: int
    video_id: int
    boa: str | None = None  # the audio tokens, where the vocabulary has them
    eoa: str | None = None
    audio: str | None = None
    audio_id: int | None = None

    @classmethod
    def from_tokenizer(cls, tokenizer, raw_config: Mapping[str, Any] | None = None) -> "MediaTokens":
        """The ids config.json names (boi_token_id, ...), else the tokens looked up by their text."""
        raw_config = raw_config or {}
        texts = {}
        for key, text in (("boi_token_id", BOI), ("eoi_token_id", EOI), ("image_token_id", IMAGE),
                          ("video_token_id", VIDEO)):
            token_id = raw_config.get(key)
            if token_id is not None:
                text = tokenizer.id_to_token(int(token_id))
                if text is None:
                    raise ValueError(f"{key}: id {token_id} is not in the tokenizer's vocabulary")
            elif tokenizer.token_to_id(text) is None:
                raise ValueError(f"tokenizer: no {text} token (needed for images)")
            texts[key] = text
        audio = {}
        # transformers' Gemma4Config spells the end-of-audio id eoa_token_index; configs also say eoa_token_id
        for key, alias, text in (("boa_token_id", None, BOA), ("eoa_token_id", "eoa_token_index", EOA),
                                 ("audio_token_id", None, AUDIO)):
            token_id = raw_config.get(key, raw_config.get(alias) if alias else None)
            audio[key] = tokenizer.id_to_token(int(token_id)) if token_id is not None else (
                text if tokenizer.token_to_id(text) is not None else None)
        audio_id = tokenizer.token_to_id(audio["audio_token_id"]) if audio["audio_token_id"] else None
        return cls(texts["boi_token_id"], texts["eoi_token_id"], texts["image_token_id"], texts["video_token_id"],
                   tokenizer.token_to_id(texts["image_token_id"]), tokenizer.token_to_id(texts["video_token_id"]),
                   audio["boa_token_id"], audio["eoa_token_id"], audio["audio_token_id"], audio_id)


@dataclass(frozen=True)
class AudioClip:
    """One audio clip's valid log-mel frames: what the audio tower takes."""

    features: torch.Tensor  # [frames, mel] float32
    soft_tokens: int
    digest: str  # the samples' digest and the features' settings, for caches


def audio_clip(audio: Audio, extractor) -> AudioClip:
    """An Audio at the extractor's rate -> its valid frames (audio_features.FeatureExtractor)."""
    cfg = extractor.cfg
    if audio.sampling_rate != cfg.sampling_rate:
        raise AudioError(f"audio: {audio.sampling_rate} Hz given, the feature extractor takes {cfg.sampling_rate} Hz")
    f = extractor(audio.samples)
    if f.soft_tokens == 0:
        raise AudioError(f"audio: {audio.seconds * 1000:.0f} ms is too short to make a soft token")
    digest = f"{audio.digest}/m{cfg.feature_size}h{cfg.hop_length}f{cfg.frame_length}"
    return AudioClip(torch.from_numpy(np.ascontiguousarray(f.values[f.mask])), f.soft_tokens, digest)


@dataclass(frozen=True)
class Frames:
    """One clip as the unified model's waveform embedder takes it: its 16 kHz samples cut into frames of
    `audio_samples_per_token` (the last zero-padded), one soft token each, as transformers'
    Gemma4UnifiedAudioFeatureExtractor cuts them."""

    frames: torch.Tensor  # [N, samples per token] float32
    soft_tokens: int
    digest: str


def waveform_frames(audio: Audio, samples_per_token: int, sampling_rate: int) -> Frames:
    if audio.sampling_rate != sampling_rate:
        raise AudioError(f"audio: the model takes {sampling_rate} Hz audio, this clip is {audio.sampling_rate} Hz "
                         f"(resample it first)")
    n = -(-audio.samples.size // samples_per_token)
    if n == 0:
        raise AudioError("audio: the clip has no samples")
    padded = np.zeros(n * samples_per_token, dtype=np.float32)
    padded[:audio.samples.size] = audio.samples
    return Frames(torch.from_numpy(padded.reshape(n, samples_per_token)), n, f"{audio.digest}/f{samples_per_token}")


@dataclass
class MultimodalPrompt:
    """Token ids with soft-token runs, and the preprocessed image of each run (a video gives one per frame;
    an audio clip its log-mel AudioClip, or for the unified model its waveform Frames)."""

    ids: list[int]
    offsets: list[int] = field(default_factory=list)  # where each run starts in ids
    patches: list[Patches | AudioClip | Frames] = field(default_factory=list)  # an image's patches, a clip

    @property
    def digests(self) -> list[str]:
        """One per run: the pixel hash of its image and the preprocessing (for prefix and prompt caches)."""
        return [p.digest for p in self.patches]

    def __len__(self) -> int:
        return len(self.ids)


# ---- messages -> template parts + media --------------------------------------------------------

def _image_of(part: Mapping[str, Any], local_files: bool) -> Image:
    kind = part.get("type")
    if kind == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, Mapping) else url
        return image_from_url(url)
    value = part.get("image", part.get("url", part.get("path")))
    if isinstance(value, Image):
        return value
    if isinstance(value, (bytes, bytearray)):
        return decode_image(bytes(value))
    if isinstance(value, (str, Path)):
        text = str(value)
        if not local_files or (re.match(r"^[a-zA-Z][\w+.-]*:", text) and not Path(text).exists()):
            return image_from_url(text)
        return load_image(text)
    if value is not None and hasattr(value, "getbands"):  # a Pillow image
        return from_pil(value)
    raise ValueError("image part: expected an image (data: URL, file path, bytes, or Image)")


def _video_of(part: Mapping[str, Any], local_files: bool) -> Video:
    value = part.get("video", part.get("path"))
    if isinstance(value, Video):
        return value
    if not local_files:
        raise ValueError("video part: videos from files are not accepted here")
    if isinstance(value, (str, Path)):
        return load_video(value, float(part.get("fps", 1.0)))
    raise ValueError("video part: expected a video file, a folder of frames, or a Video")


def _audio_of(part: Mapping[str, Any], local_files: bool) -> Audio:
    """{"type": "input_audio", "input_audio": {"data": base64, "format": "wav"}} (OpenAI), or
    {"type": "audio", "audio": PATH | bytes | Audio}."""
    if part.get("type") == "input_audio":
        body = part.get("input_audio")
        if not isinstance(body, Mapping):
            raise AudioError("input_audio: expected an object with data (base64) and format")
        fmt = body.get("format")
        if fmt is not None and str(fmt).lower() not in ("wav", "mp3", "flac", "ogg"):
            raise AudioError(f"input_audio.format: {fmt!r} is not supported (wav, mp3, flac or ogg)")
        return decode_base64_audio(body.get("data"), "input_audio")
    value = part.get("audio", part.get("path"))
    if isinstance(value, Audio):
        return value
    if isinstance(value, np.ndarray):  # samples, at 16 kHz unless the part names its sampling_rate
        if not np.isfinite(value).all():
            raise AudioError("audio: the samples have NaN or infinite values")
        rate = int(part.get("sampling_rate", SAMPLING_RATE))
        return Audio.from_array(resample(np.asarray(value, dtype=np.float32).reshape(-1), rate, SAMPLING_RATE))
    if isinstance(value, (bytes, bytearray)):
        return decode_audio(bytes(value))
    if isinstance(value, (str, Path)):
        if not local_files or str(value).startswith("data:"):
            return decode_base64_audio(str(value), "audio")
        return load_audio(value)
    raise AudioError("audio part: expected an audio file, bytes, base64 data, samples, or Audio")


def collect_media(messages: list, local_files: bool = True) -> tuple[list, list[Image | Video | Audio]]:
    """Messages whose media parts are plain {"type": "image"/"video"/"audio"}, and the media in order.
    With local_files off (a server's requests), a string is only ever a data: URL, never a path."""
    media: list[Image | Video | Audio] = []
    out = []
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(content, list):
            out.append(message)
            continue
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind in ("image", "image_url"):
                media.append(_image_of(part, local_files))
                parts.append({"type": "image"})
            elif kind == "video":
                media.append(_video_of(part, local_files))
                parts.append({"type": "video"})
            elif kind in ("audio", "input_audio"):
                media.append(_audio_of(part, local_files))
                parts.append({"type": "audio"})
            else:
                parts.append(part)
        out.append({**message, "content": parts})
    return out, media


def has_media(messages: list) -> bool:
    return any(isinstance(m, Mapping) and isinstance(m.get("content"), list)
               and any(isinstance(p, Mapping) and p.get("type") in MEDIA_PARTS for p in m["content"])
               for m in messages)


def media_kinds(media: list) -> set[str]:
    """"vision" and/or "audio": the towers a list of media needs."""
    return {"audio" if isinstance(m, Audio) else "vision" for m in media}


def part_kinds(messages: list) -> set[str]:
    """"vision" and/or "audio": the towers the media parts of messages need (before decoding them)."""
    return {"audio" if p.get("type") in ("audio", "input_audio") else "vision"
            for m in messages if isinstance(m, Mapping) and isinstance(m.get("content"), list)
            for p in m["content"] if isinstance(p, Mapping) and p.get("type") in MEDIA_PARTS}


# ---- placeholders -> token ids ------------------------------------------------------------------

def expand(text: str, media: list[Image | Video | Audio], tokens: MediaTokens, tokenizer, *, patch_size: int = 0,
           pooling_kernel_size: int = 0, image_soft_tokens: int = 0, video_soft_tokens: int = 0,
           audio_extractor=None, audio_seq_length: int = 750, audio_frames=None) -> MultimodalPrompt:
    """Tokenize `text`, its media placeholders expanded as the reference processor expands them.
    `audio_extractor` (audio_features.FeatureExtractor): the model's, where it takes audio through a tower;
    `audio_frames(Audio) -> Frames`: the unified model's cut of a clip into waveform frames."""
    marks = [tokens.image, tokens.video] + ([tokens.audio] if tokens.audio else [])
    pieces = re.split("(" + "|".join(re.escape(m) for m in marks) + ")", text)
    placeholders = pieces[1::2]
    if len(placeholders) != len(media):
        raise ValueError(f"the prompt has {len(placeholders)} image/video/audio placeholders for {len(media)} "
                         f"images, videos and audio clips")
    expanded = [pieces[0]]
    patches: list[Patches | AudioClip | Frames] = []
    for placeholder, item, after in zip(placeholders, media, pieces[2::2]):
        if placeholder == tokens.audio:
            if not isinstance(item, Audio):
                raise ValueError("an image or video was given where the prompt has an audio placeholder")
            takes = audio_extractor is not None or audio_frames is not None
            if not takes or tokens.boa is None or tokens.eoa is None:
                raise ValueError("this model takes no audio (no audio tower, or no audio tokens in its vocabulary)")
            clip = audio_frames(item) if audio_frames is not None else audio_clip(item, audio_extractor)
            if audio_frames is None and clip.soft_tokens > audio_seq_length:
                raise AudioError(f"audio: {clip.soft_tokens} soft tokens, more than the {audio_seq_length} a clip "
                                 f"may take")
            patches.append(clip)
            expanded.append(tokens.boa + tokens.audio * clip.soft_tokens + tokens.eoa)
        elif isinstance(item, Audio):
            raise ValueError("an audio clip was given where the prompt has an image or video placeholder")
        elif placeholder == tokens.image:
            if not isinstance(item, Image):
                raise ValueError("a video was given where the prompt has an image placeholder")
            p = preprocess(item, patch_size, pooling_kernel_size, image_soft_tokens)
            patches.append(p)
            expanded.append(tokens.boi + tokens.image * p.soft_tokens + tokens.eoi)
        else:
            if not isinstance(item, Video):
                raise ValueError("an image was given where the prompt has a video placeholder")
            blocks = []
            for frame, seconds in zip(item.frames, item.timestamps):
                p = preprocess(frame, patch_size, pooling_kernel_size, video_soft_tokens)
                patches.append(p)
                blocks.append(f"{timestamp_text(seconds)} {tokens.boi}{tokens.video * p.soft_tokens}{tokens.eoi}")
            expanded.append(" ".join(blocks))
        expanded.append(after)
    ids = tokenizer.encode("".join(expanded), add_special_tokens=False)

    soft = {tokens.image_id, tokens.video_id} | ({tokens.audio_id} if tokens.audio_id is not None else set())
    runs: list[tuple[int, int]] = []  # (start, length) of each run of one soft token
    i = 0
    while i < len(ids):
        j = i + 1
        if ids[i] in soft:
            while j < len(ids) and ids[j] == ids[i]:
                j += 1
            runs.append((i, j - i))
        i = j
    if [n for _, n in runs] != [p.soft_tokens for p in patches]:
        raise ValueError("the prompt text contains image, video or audio soft tokens of its own")
    return MultimodalPrompt(ids, [start for start, _ in runs], patches)


# ---- patches -> embeddings ---------------------------------------------------------------------

def encode(prompt: MultimodalPrompt, vision, cache: dict | None = None, cache_size: int = 16, audio=None
           ) -> list[tuple[int, torch.Tensor]]:
    """(offset, [n, text hidden] embeddings) per soft-token run, through the vision tower (images, frames)
    or the audio tower (clips). Media repeated in the prompt are encoded once; `cache` (digest ->
    embeddings, the newest `cache_size` kept) carries them across prompts, so a conversation's earlier
    media are not encoded again each turn. `vision` and `audio`: the encoders, or callables
    returning them (called only when a run needs one)."""
    done: dict[str, torch.Tensor] = {} if cache is None else cache
    out = []
    for offset, p in zip(prompt.offsets, prompt.patches):
        if p.digest in done:
            done[p.digest] = done.pop(p.digest)  # the newest again
        else:
            done[p.digest] = (_encoder(audio).encode(p.frames) if isinstance(p, Frames)
                              else _encoder(audio).encode(p.features) if isinstance(p, AudioClip)
                              else _encoder(vision).encode(p.pixel_values, p.positions))
            while cache is not None and len(done) > cache_size:
                done.pop(next(iter(done)))
        out.append((offset, done[p.digest]))
    return out


def _encoder(given):
    """An encoder, or the function that builds it (a tower is built only when a run needs it)."""
    return given if hasattr(given, "encode") else given()
