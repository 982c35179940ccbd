"""Speculative decoding: verify.py (acceptance rules, rollback: below the engine), drafters.py (above it).

The drafters' names are imported on first use (PEP 562): the engine needs verify.py on every run, the drafters
(and the assistant checkpoint reader behind them) only when speculation is asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .verify import (MAX_DRAFT, AdaptiveK, DraftContext, Drafter, Speculation, accept, check_k, draft_room,
                     propose, release, verify_batch, verify_logits)

_DRAFTERS = ("AssistantDrafter", "DraftModel", "PromptLookup", "check_vocabulary", "drafter_for", "load_drafter")

if TYPE_CHECKING:
    from .drafters import AssistantDrafter, DraftModel, PromptLookup, check_vocabulary, drafter_for, load_drafter

__all__ = [*_DRAFTERS, "MAX_DRAFT", "AdaptiveK", "DraftContext", "Drafter", "Speculation", "accept", "check_k",
           "draft_room", "propose", "release", "verify_batch", "verify_logits"]


def __getattr__(name: str):
    if name not in _DRAFTERS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(".drafters", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
