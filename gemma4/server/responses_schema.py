"""The OpenAI Responses API request body (POST /v1/responses), as a pydantic model.

The scalar fields are checked here; `input`, `tools` and `tool_choice` are checked item by item where
they are translated (openai_responses.py), so that an error names the item. Fields we do not use are
accepted and ignored, as in schema.py.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import Field

from .schema import _Body


class Reasoning(_Body):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None  # the older name of summary


class TextConfig(_Body):
    format: dict[str, Any] | None = None


class ResponseRequest(_Body):
    model: str | None = None
    input: Union[str, list[dict[str, Any]], None] = None
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool = True
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], dict[str, Any], None] = None
    parallel_tool_calls: bool | None = None
    reasoning: Reasoning | None = None
    text: TextConfig | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)  # our extensions, spelled as in chat completions
    min_p: float | None = Field(default=None, ge=0, le=1)
    seed: int | None = None
    metadata: dict[str, str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    user: str | None = None
    # what we cannot do and must not pretend to: refused when set (openai_responses.py)
    background: bool | None = None
    conversation: Any = None
    prompt: Any = None
