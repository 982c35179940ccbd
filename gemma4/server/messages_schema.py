"""The Anthropic Messages API request bodies (POST /v1/messages and /v1/messages/count_tokens), as
pydantic models.

Scalars are checked here; content blocks, tools and tool_choice are checked block by block where they
are translated (anthropic_messages.py), so that an error names the block. Fields we do not use are
accepted and ignored.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import Field

from .schema import _Body


class MessageParam(_Body):
    role: Literal["user", "assistant"]
    content: Union[str, list[dict[str, Any]]]


class ThinkingConfig(_Body):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(default=None, ge=1)


class OutputConfig(_Body):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    format: dict[str, Any] | None = None


class CountTokensRequest(_Body):
    model: str | None = None
    messages: list[MessageParam]
    system: Union[str, list[dict[str, Any]], None] = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: ThinkingConfig | None = None
    output_config: OutputConfig | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    metadata: dict[str, Any] | None = None
