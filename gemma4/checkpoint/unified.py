"""The unified model's (gemma4_unified) image and audio embedders inside its HF folder: config.json's
vision_config / audio_config and the model.embed_vision.* / model.embed_audio.* tensors, under our names
(names.UNIFIED_VISION_TENSORS, names.WAVEFORM_AUDIO_TENSORS)."""

from __future__ import annotations

from ..config.unified import UnifiedVisionConfig, WaveformAudioConfig
from . import names
from .hf_parts import HFPart, read_json


class _EmbedderCheckpoint(HFPart):
    what = ""

    def __init__(self, text_checkpoint, config, table: list[tuple[str, str]]):
        self.config = config
        super().__init__(text_checkpoint.files, lambda key: names.unified_from_hf(key, table),
                         missing=f"{text_checkpoint.folder}: config.json describes the {self.what}, but the "
                                 f"checkpoint has none of its tensors ({table[0][1]}, ...)")


class UnifiedVisionCheckpoint(_EmbedderCheckpoint):
    what = "unified vision embedder"

    def __init__(self, text_checkpoint):
        processor = read_json(text_checkpoint.folder / "processor_config.json")
        config = UnifiedVisionConfig.from_hf(text_checkpoint.raw_config["vision_config"],
                                             text_checkpoint.config.hidden_size, processor)
        super().__init__(text_checkpoint, config, names.UNIFIED_VISION_TENSORS)


class WaveformAudioCheckpoint(_EmbedderCheckpoint):
    what = "waveform audio embedder"

    def __init__(self, text_checkpoint):
        config = WaveformAudioConfig.from_hf(text_checkpoint.raw_config["audio_config"],
                                             text_checkpoint.config.hidden_size)
        super().__init__(text_checkpoint, config, names.WAVEFORM_AUDIO_TENSORS)


def unified_media(text_checkpoint) -> tuple[UnifiedVisionCheckpoint | None, WaveformAudioCheckpoint | None]:
    """The embedders a gemma4_unified folder declares (None for one its config.json leaves out)."""
    raw = getattr(text_checkpoint, "raw_config", None) or {}
    if raw.get("model_type") != "gemma4_unified" or not hasattr(text_checkpoint, "files"):
        return None, None
    vision = UnifiedVisionCheckpoint(text_checkpoint) if isinstance(raw.get("vision_config"), dict) else None
    audio = WaveformAudioCheckpoint(text_checkpoint) if isinstance(raw.get("audio_config"), dict) else None
    return vision, audio
