"""Speculative decoding: verify.py (acceptance rules, rollback: below the engine), drafters.py (above it)."""

from .drafters import AssistantDrafter, DraftModel, PromptLookup, check_vocabulary, drafter_for, load_drafter
from .verify import (MAX_DRAFT, AdaptiveK, DraftContext, Drafter, Speculation, accept, check_k, draft_room,
                     propose, release, verify_batch, verify_logits)

__all__ = ["AssistantDrafter", "DraftModel", "PromptLookup", "check_vocabulary", "drafter_for", "load_drafter",
           "MAX_DRAFT", "AdaptiveK", "DraftContext", "Drafter", "Speculation", "accept", "check_k", "draft_room",
           "propose", "release", "verify_batch", "verify_logits"]
