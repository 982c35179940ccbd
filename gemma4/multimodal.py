"""Prompt assembly for images and videos.

1. `collect_media(messages)`: the image and video parts of OpenAI-style messages are decoded (data:
   URLs, files, Image objects) and replaced by `{"type": "image"}` / `{"type": "video"}` parts, which
   the chat template renders as the `<|image|>` / `<|video|>` placeholders.
2. `expand(text, media, ...)`: as the reference processor does, each image placeholder becomes
   begin-of-image, N soft tokens, end-of-image, and each video placeholder one such block per frame,
   each after its `mm:ss` timestamp, frames separated by spaces; then the text is tokenized.
3. `encode(prompt, vision)`: the vision tower turns each block's patches into N embeddings, which
   replace the soft tokens' embeddings in the decoder (engine: Sequence.soft).
Audio (the unified model's waveform frames): each `<|audio|>` placeholder becomes begin-of-audio, one soft
token per frame, end-of-audio; the audio embedder encodes the frames.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from .images import Image, Patches, decode_image, from_pil, image_from_url, load_image, preprocess
from .video import Video, load_video, timestamp_text
from .waveform import Frames, Waveform, load_waveform

# The texts of the media tokens in Gemma 4's vocabulary (the processor's boi/eoi/image/video tokens).
BOI, EOI, IMAGE, VIDEO = "<|image>", "<image|>", "<|image|>", "<|video|>"
BOA, EOA, AUDIO = "<|audio>", "<audio|>", "<|audio|>"


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
        audio = {}  # config.json spells the end-of-audio id eoa_token_index (transformers' Gemma4Config)
        for key, alias, text in (("boa_token_id", None, BOA), ("eoa_token_id", "eoa_token_index", EOA),
                                 ("audio_token_id", None, AUDIO)):
            token_id = raw_config.get(key, raw_config.get(alias)) if alias else raw_config.get(key)
            found = tokenizer.id_to_token(int(token_id)) if token_id is not None else None
            audio[key] = found if found is not None else text if tokenizer.token_to_id(text) is not None else None
        if None in audio.values():
            audio = dict.fromkeys(audio)
        return cls(texts["boi_token_id"], texts["eoi_token_id"], texts["image_token_id"], texts["video_token_id"],
                   tokenizer.token_to_id(texts["image_token_id"]), tokenizer.token_to_id(texts["video_token_id"]),
                   audio["boa_token_id"], audio["eoa_token_id"], audio["audio_token_id"],
                   None if audio["audio_token_id"] is None else tokenizer.token_to_id(audio["audio_token_id"]))


@dataclass
class MultimodalPrompt:
    """Token ids with soft-token runs, and the preprocessed image of each run (a video gives one per frame;
    an audio clip gives its Frames)."""

    ids: list[int]
    offsets: list[int] = field(default_factory=list)  # where each run starts in ids
    patches: list[Patches | Frames] = field(default_factory=list)

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


def _audio_of(part: Mapping[str, Any], local_files: bool) -> Waveform:
    value = part.get("audio", part.get("path"))
    if isinstance(value, Waveform):
        return value
    if isinstance(value, (str, Path)):
        if not local_files:
            raise ValueError("audio part: audio from files is not accepted here")
        return load_waveform(value)
    if value is not None and hasattr(value, "__len__"):  # samples (numpy array or list)
        return Waveform.from_array(value, int(part.get("sampling_rate", 16_000)))
    raise ValueError("audio part: expected a Waveform, an array of samples, or an audio file")


def collect_media(messages: list, local_files: bool = True) -> tuple[list, list[Image | Video | Waveform]]:
    """Messages whose media parts are plain {"type": "image"/"video"/"audio"}, and the media in order.
    With local_files off (a server's requests), a string is only ever a data: URL, never a path."""
    media: list[Image | Video | Waveform] = []
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
            elif kind == "audio":
                media.append(_audio_of(part, local_files))
                parts.append({"type": "audio"})
            else:
                parts.append(part)
        out.append({**message, "content": parts})
    return out, media


def media_kinds(messages: list) -> set[str]:
    """The media part types among the messages' content parts ("image" for image_url too)."""
    kinds = {"image_url": "image", "image": "image", "video": "video", "audio": "audio"}
    return {kinds[p["type"]] for m in messages if isinstance(m, Mapping) and isinstance(m.get("content"), list)
            for p in m["content"] if isinstance(p, Mapping) and p.get("type") in kinds}


def has_media(messages: list) -> bool:
    return bool(media_kinds(messages))


# ---- placeholders -> token ids ------------------------------------------------------------------

def expand(text: str, media: list[Image | Video | Waveform], tokens: MediaTokens, tokenizer, *, patch_size: int,
           pooling_kernel_size: int, image_soft_tokens: int, video_soft_tokens: int, audio_frames=None
           ) -> MultimodalPrompt:
    """Tokenize `text`, its media placeholders expanded as the reference processor expands them.
    audio_frames(Waveform) -> Frames: how the model cuts audio (None: it takes none)."""
    audio = tokens.audio if audio_frames is not None else None  # otherwise <|audio|> is plain text, as before
    if audio_frames is not None and audio is None:
        raise ValueError("tokenizer: no <|audio>, <audio|>, <|audio|> tokens (needed for audio)")
    kinds = [tokens.image, tokens.video] + ([audio] if audio else [])
    pieces = re.split("(" + "|".join(re.escape(k) for k in kinds) + ")", text)
    placeholders = pieces[1::2]
    if len(placeholders) != len(media):
        raise ValueError(f"the prompt has {len(placeholders)} image/video/audio placeholders for {len(media)} media "
                         f"items")
    expanded = [pieces[0]]
    patches: list[Patches | Frames] = []
    for placeholder, item, after in zip(placeholders, media, pieces[2::2]):
        if isinstance(item, Waveform) and placeholder != audio:
            raise ValueError("audio was given where the prompt has an image or video placeholder")
        if placeholder == audio:
            if not isinstance(item, Waveform):
                raise ValueError("an image or video was given where the prompt has an audio placeholder")
            f = audio_frames(item)
            patches.append(f)
            expanded.append(tokens.boa + tokens.audio * f.soft_tokens + tokens.eoa)
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

    soft = {tokens.image_id, tokens.video_id} | ({tokens.audio_id} if audio else set())
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
    """(offset, [n, text hidden] embeddings) per soft-token run. An image repeated in the prompt is
    encoded once; `cache` (digest -> embeddings, the newest `cache_size` kept) carries them across
    prompts, so a conversation's earlier images are not encoded again each turn. `vision` and `audio`:
    the encoders (or callables returning them, called only when a run needs one)."""
    done: dict[str, torch.Tensor] = {} if cache is None else cache
    out = []
    for offset, p in zip(prompt.offsets, prompt.patches):
        if p.digest in done:
            done[p.digest] = done.pop(p.digest)  # the newest again
        else:
            if isinstance(p, Frames):
                done[p.digest] = _encoder(audio).encode(p.frames)
            else:
                done[p.digest] = _encoder(vision).encode(p.pixel_values, p.positions)
            while cache is not None and len(done) > cache_size:
                done.pop(next(iter(done)))
        out.append((offset, done[p.digest]))
    return out


def _encoder(given):
    """An encoder, or the function that builds it (a tower is built only when a run needs it)."""
    return given if hasattr(given, "encode") else given()
