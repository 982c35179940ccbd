"""Audio in: WAV, FLAC, MP3 and OGG decoded (soundfile: libsndfile with its MPEG decoder) to float32 mono at
the feature extractor's rate.

As transformers' audio loader does it on its soundfile path (the same steps as `librosa.load`): samples
read as float32, channels averaged, resampled with soxr at its "HQ" quality, then padded or cut to
ceil(samples * rate / source rate). Anything that is not usable audio raises AudioError with one line.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import AudioError

SAMPLING_RATE = 16_000
FORMATS = {"WAV": "WAV", "WAVEX": "WAV", "RF64": "WAV", "W64": "WAV", "FLAC": "FLAC", "MP3": "MP3", "OGG": "OGG"}
MAX_SECONDS = 30.0  # the feature extractor's max_length (480 000 samples at 16 kHz)


@dataclass(frozen=True)
class Audio:
    samples: np.ndarray  # [n] float32 mono at `sampling_rate`
    sampling_rate: int
    digest: str  # sha256 of the rate and the samples: equal audio, equal digest

    @classmethod
    def from_array(cls, samples: np.ndarray, sampling_rate: int = SAMPLING_RATE) -> "Audio":
        samples = np.ascontiguousarray(samples, dtype=np.float32).reshape(-1)
        h = hashlib.sha256(f"audio{sampling_rate}:".encode())
        h.update(samples.tobytes())
        return cls(samples, sampling_rate, h.hexdigest())

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.sampling_rate


def _wav_truncated(data: bytes) -> bool:
    """A RIFF/WAVE file whose data chunk declares more bytes than the file holds (libsndfile reads
    what is there without a word)."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return False
    at = 12
    while at + 8 <= len(data):
        kind, size = data[at:at + 4], struct.unpack("<I", data[at + 4:at + 8])[0]
        if kind == b"data":
            return size not in (0, 0xFFFFFFFF) and at + 8 + size > len(data)  # 0 / -1: a stream of unknown length
        at += 8 + size + (size & 1)
    return False


def resample(samples: np.ndarray, source_rate: int, rate: int) -> np.ndarray:
    """soxr at HQ quality, then exactly ceil(n * rate / source_rate) samples, as librosa.load gives."""
    if source_rate == rate:
        return samples
    import soxr

    n = math.ceil(len(samples) * rate / source_rate)
    out = soxr.resample(samples, source_rate, rate, quality="soxr_hq")
    return np.pad(out, (0, max(0, n - len(out))))[:n]


def decode_audio(data: bytes, what: str = "audio", sampling_rate: int = SAMPLING_RATE,
                 max_seconds: float = MAX_SECONDS) -> Audio:
    """Encoded WAV, FLAC, MP3 or OGG bytes -> Audio at `sampling_rate`. AudioError (one line, naming
    `what`) for anything else, a damaged or truncated file, no samples, or more than `max_seconds`."""
    import soundfile as sf

    if not data:
        raise AudioError(f"{what}: empty audio data")
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            kind = FORMATS.get(f.format)
            if kind is None:
                raise AudioError(f"{what}: {f.format} audio is not supported (expected WAV, FLAC, MP3 or OGG)")
            rate, declared = f.samplerate, f.frames
            if declared > max_seconds * rate * 1.01:  # before decoding it (the MP3 count is an estimate)
                raise AudioError(f"{what}: {declared / rate:.1f} s of audio is too long (at most {max_seconds:g} s "
                                 f"per clip; split it)")
            samples = f.read(dtype="float32", always_2d=True)
    except AudioError:
        raise
    except (sf.LibsndfileError, RuntimeError, EOFError) as e:
        message = str(e).split(": ", 1)[-1].strip() if ": " in str(e) else str(e)
        if "not recognised" in message or "unimplemented format" in message or "regular file" in message:
            raise AudioError(f"{what}: not audio in a supported format (WAV, FLAC, MP3 or OGG)") from None
        raise AudioError(f"{what}: cannot decode the audio ({message})") from None
    if len(samples) < declared or (kind == "WAV" and _wav_truncated(data)):
        raise AudioError(f"{what}: the {kind} file is truncated")
    if len(samples) == 0:
        raise AudioError(f"{what}: the audio holds no samples")
    if not np.isfinite(samples).all():
        raise AudioError(f"{what}: the audio holds non-finite samples")
    if len(samples) > max_seconds * rate:
        raise AudioError(f"{what}: {len(samples) / rate:.1f} s of audio is too long (at most {max_seconds:g} s "
                         f"per clip; split it)")
    mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    out = resample(mono.astype(np.float32), rate, sampling_rate)
    return Audio.from_array(out, sampling_rate)


def load_audio(path: str | Path, sampling_rate: int = SAMPLING_RATE) -> Audio:
    path = Path(path).expanduser()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise AudioError(f"{path}: no such audio file") from None
    except OSError as e:
        raise AudioError(f"{path}: cannot read ({e.strerror or e})") from None
    return decode_audio(data, str(path), sampling_rate)


def decode_base64_audio(payload: str, what: str = "input_audio", sampling_rate: int = SAMPLING_RATE) -> Audio:
    """OpenAI's input_audio data (base64, or a data: URL of an audio type) -> Audio."""
    if not isinstance(payload, str) or not payload.strip():
        raise AudioError(f"{what}: expected base64-encoded audio data")
    text = payload.strip()
    if text.startswith("data:"):
        head, _, text = text.partition(",")
        mime = head[5:].split(";", 1)[0].lower()
        if mime and not mime.startswith("audio/"):
            raise AudioError(f"{what}: a data: URL of type {mime!r} is not audio")
        if not head.endswith(";base64"):
            raise AudioError(f"{what}: the data: URL is not base64-encoded")
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise AudioError(f"{what}: the base64 payload is malformed") from None
    return decode_audio(data, what, sampling_rate)
