"""Audio as the unified model takes it: a mono float waveform at 16 kHz, cut into frames of
`audio_samples_per_token` samples (the last one zero-padded), one soft token per frame, as transformers'
Gemma4UnifiedAudioFeatureExtractor cuts it.

Decoding files is load_waveform's one job here (soundfile, optional); resampling is not done: a clip at
another rate is refused with a clear message.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass(frozen=True)
class Waveform:
    samples: np.ndarray  # [n] float32, mono
    sampling_rate: int

    @classmethod
    def from_array(cls, samples, sampling_rate: int = 16_000) -> "Waveform":
        """A waveform from samples ([n], or [n, channels] averaged to mono) at `sampling_rate` Hz."""
        x = np.asarray(samples)
        if not np.issubdtype(x.dtype, np.number):
            raise ValueError("audio: the waveform must be numbers")
        x = x.astype(np.float32)
        if x.ndim == 2:
            x = x.mean(axis=1, dtype=np.float32)
        if x.ndim != 1 or x.size == 0:
            raise ValueError(f"audio: expected a non-empty waveform of shape [samples] or [samples, channels], "
                             f"got {list(np.asarray(samples).shape)}")
        if not np.isfinite(x).all():
            raise ValueError("audio: the waveform has NaN or infinite samples")
        return cls(x, int(sampling_rate))

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.samples.tobytes()).hexdigest()[:32] + f"@{self.sampling_rate}"


def load_waveform(path: str | Path) -> Waveform:
    """A sound file (WAV, FLAC, OGG: what libsndfile decodes) as a mono waveform."""
    try:
        import soundfile
    except ImportError:
        raise ValueError("audio files need the soundfile package (pip install soundfile)") from None
    try:
        samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, OSError, soundfile.LibsndfileError) as e:
        raise ValueError(f"{path}: not a readable audio file ({e})") from None
    return Waveform.from_array(samples, rate)


@dataclass(frozen=True)
class Frames:
    """One clip as the waveform embedder takes it."""

    frames: torch.Tensor  # [N, samples per token] float32
    soft_tokens: int
    digest: str


def waveform_frames(wave: Waveform, samples_per_token: int, sampling_rate: int) -> Frames:
    if wave.sampling_rate != sampling_rate:
        raise ValueError(f"audio: the model takes {sampling_rate} Hz audio, this clip is {wave.sampling_rate} Hz "
                         f"(resample it first)")
    n = -(-wave.samples.size // samples_per_token)
    padded = np.zeros(n * samples_per_token, dtype=np.float32)
    padded[:wave.samples.size] = wave.samples
    return Frames(torch.from_numpy(padded.reshape(n, samples_per_token)), n, f"{wave.digest}/f{samples_per_token}")
