"""gemma4: an inference engine for Google's Gemma 4 (and Gemma 3) models.

The names below are imported on first use (PEP 562), so that `import gemma4` and the command line's fast
paths (--help, list) do not pay for torch and the model code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = ["load", "Model", "Completion", "ModelConfig", "ModelLoadError", "SamplingParams"]
__version__ = "0.1.0"

_HOMES = {"load": "api", "Model": "api", "Completion": "api", "ModelConfig": "config", "ModelLoadError": "errors",
          "SamplingParams": "sampling"}

if TYPE_CHECKING:
    from .api import Completion, Model, load
    from .config.text import ModelConfig
    from .errors import ModelLoadError
    from .sampling import SamplingParams


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'gemma4' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
