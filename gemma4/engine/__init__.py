"""The engine: requests (sequence.py), who runs (scheduler.py), forwards (runner.py), the step loop (engine.py)."""

from .engine import Engine
from .runner import PREFILL_CHUNK, Runner, chunk_end, joined_columns, prefill, resume_points, soft_embeds
from .scheduler import QueueFull, Scheduler, Stats, TooLarge
from .sequence import Request, RequestOutput, Sequence, StepOutput, TokenLogprob

__all__ = ["Engine", "Request", "RequestOutput", "Sequence", "StepOutput", "TokenLogprob", "QueueFull",
           "TooLarge", "Scheduler", "Stats", "Runner", "PREFILL_CHUNK", "chunk_end", "joined_columns", "prefill",
           "resume_points", "soft_embeds"]
