"""Every architectural number of a model, parsed from config.json or GGUF metadata, one module a part:

common.py      the layer types (sliding, full), RopeSpec, the supported activation
text.py        ModelConfig, the text decoder, with its per-layer facts (head_dim, KV heads, KV source, ...)
text_hf.py     config.json -> ModelConfig's fields: the Gemma 4 family's defaults, the Gemma 3 reading
assistant.py   AssistantConfig, the MTP drafter around a decoder
vision.py      VisionConfig, the vision tower; the soft-token budgets an image may take
audio.py       AudioConfig, the audio tower
unified.py     the 12B unified model's media embedders
"""

from .assistant import AssistantConfig
from .audio import AudioConfig
from .common import FULL, SLIDING, RopeSpec
from .text import ModelConfig
from .vision import VisionConfig

__all__ = ["AssistantConfig", "AudioConfig", "FULL", "ModelConfig", "RopeSpec", "SLIDING", "VisionConfig"]
