"""Log-mel features of a waveform, as Gemma 4's audio feature extractor computes them.

The recipe (transformers' Gemma4AudioFeatureExtractor, in the same numpy precision):
- the waveform (float32 mono at `sampling_rate`) is padded with zeros to a multiple of 128 samples,
  then `frame_length // 2` zeros go before it (semicausal framing: the first frame centred on t = 0);
- frames of `frame_length + 1` samples every `hop_length`; the last sample only serves preemphasis, so
  each frame is its first `frame_length` samples (preemphasis is 0 in Gemma 4), times a periodic Hann window;
- |rfft| over `fft_length` (the next power of two), through an HTK mel filter bank (no normalisation),
  then log(mel + mel_floor);
- a frame is valid when the last sample of its window is real audio, not padding; invalid frames are zeroed.

The audio tower turns 4 frames into one soft token (two stride-2 convolutions), so `soft_tokens`
counts the valid frames left after taking every second one twice, as the processor counts them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PAD_TO_MULTIPLE_OF = 128  # samples; the extractor's default padding


@dataclass(frozen=True)
class FeatureConfig:
    """The feature extractor's numbers (preprocessor_config.json / processor_config.json)."""

    feature_size: int = 128  # mel bins
    sampling_rate: int = 16_000
    frame_length_ms: float = 20.0
    hop_length_ms: float = 10.0
    min_frequency: float = 0.0
    max_frequency: float = 8000.0
    mel_floor: float = 1e-3
    max_samples: int = 480_000  # 30 s: the extractor's max_length; longer audio is refused, not cut

    @property
    def frame_length(self) -> int:
        return int(round(self.sampling_rate * self.frame_length_ms / 1000.0))

    @property
    def hop_length(self) -> int:
        return int(round(self.sampling_rate * self.hop_length_ms / 1000.0))

    @property
    def fft_length(self) -> int:
        return 2 ** math.ceil(math.log2(self.frame_length))

    @classmethod
    def from_dict(cls, raw: dict | None) -> "FeatureConfig":
        """From a feature_extractor section; unsupported options (preemphasis, dither, per-bin
        normalisation) raise ValueError rather than being ignored."""
        raw = dict(raw or {})
        for key, neutral in (("preemphasis", 0.0), ("dither", 0.0), ("input_scale_factor", 1.0),
                             ("fft_overdrive", False), ("per_bin_mean", None), ("per_bin_stddev", None)):
            if raw.get(key, neutral) != neutral:
                raise ValueError(f"feature_extractor.{key}: {raw[key]!r} is not supported")
        fields = {f: raw[f] for f in ("feature_size", "sampling_rate", "frame_length_ms", "hop_length_ms",
                                      "min_frequency", "max_frequency", "mel_floor") if raw.get(f) is not None}
        return cls(**fields)


def hann_window(length: int) -> np.ndarray:
    """The periodic Hann window: 0.5 - 0.5 cos(2 pi n / length), float32."""
    return np.hanning(length + 1)[:-1].astype(np.float32)


def _hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + f / 700.0)


def _mel_to_hz(m):
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filters(cfg: FeatureConfig) -> np.ndarray:
    """[fft_length // 2 + 1, feature_size] triangular filters on the HTK mel scale, float64."""
    bins = cfg.fft_length // 2 + 1
    edges = _mel_to_hz(np.linspace(_hz_to_mel(cfg.min_frequency), _hz_to_mel(cfg.max_frequency),
                                   cfg.feature_size + 2))
    freqs = np.linspace(0, cfg.sampling_rate // 2, bins)
    widths = np.diff(edges)
    distance = edges[None, :] - freqs[:, None]
    rising = -distance[:, :-2] / widths[:-1]
    falling = distance[:, 2:] / widths[1:]
    return np.maximum(0.0, np.minimum(rising, falling))


@dataclass(frozen=True)
class Features:
    values: np.ndarray  # [frames, feature_size] float32, invalid frames zero
    mask: np.ndarray  # [frames] bool: frames entirely over real audio

    @property
    def soft_tokens(self) -> int:
        return int(self.mask[::2][::2].sum())


class FeatureExtractor:
    def __init__(self, cfg: FeatureConfig | None = None):
        self.cfg = cfg or FeatureConfig()
        self.window = hann_window(self.cfg.frame_length)
        self.filters = mel_filters(self.cfg)

    def __call__(self, waveform: np.ndarray) -> Features:
        """A float32 mono waveform at cfg.sampling_rate -> its log-mel features and valid-frame mask."""
        cfg = self.cfg
        x = np.asarray(waveform, dtype=np.float32).reshape(-1)
        padded = -len(x) % PAD_TO_MULTIPLE_OF
        valid = np.concatenate([np.ones(len(x), bool), np.zeros(padded, bool)])
        half = cfg.frame_length // 2
        x = np.concatenate([np.zeros(half, np.float32), x, np.zeros(padded, np.float32)])
        valid = np.concatenate([np.zeros(half, bool), valid])
        span = cfg.frame_length + 1  # one extra sample, used by preemphasis only
        n = (len(x) - span) // cfg.hop_length + 1
        if n <= 0:
            return Features(np.zeros((0, cfg.feature_size), np.float32), np.zeros(0, bool))
        starts = np.arange(n) * cfg.hop_length
        frames = x[starts[:, None] + np.arange(cfg.frame_length)[None, :]] * self.window
        magnitude = np.abs(np.fft.rfft(frames, n=cfg.fft_length, axis=-1))
        log_mel = np.log(magnitude @ self.filters + np.float64(cfg.mel_floor)).astype(np.float32)
        mask = valid[starts + span - 1]
        return Features(log_mel * mask[:, None], mask)
