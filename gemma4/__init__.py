"""gemma4: an inference engine for Google's Gemma 4 (and Gemma 3) models."""

from .api import Completion, Model, load
from .config import ModelConfig
from .errors import ModelLoadError
from .sampling import SamplingParams

__all__ = ["load", "Model", "Completion", "ModelConfig", "ModelLoadError", "SamplingParams"]
__version__ = "0.1.0"
