"""Anthropic's Messages API: POST /v1/messages and /v1/messages/count_tokens.

A request is translated into the internal chat request (the messages, tools and settings chat
completions takes) and prepared and run exactly as chat completions are, so every API shares the engine,
its batching and its prefix reuse. Errors under these paths take Anthropic's shape (app.py).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from .answer import Answer
from .anthropic_events import MessageBuilder, new_id
from .backend import Backend
from .errors import APIError
from .messages_schema import CountTokensRequest, MessagesRequest

# chat request field -> how this API spells it, for errors raised while preparing
FIELDS = {"max_completion_tokens": "max_tokens", "response_format": "output_config.format",
          "reasoning_effort": "output_config.effort", "stop": "stop_sequences"}
_EFFORTS = {"xhigh": "high", "max": "high"}  # efforts past Gemma's highest are its highest


def owns(path: str) -> bool:
    """Whether a request path is this API's (its errors then take Anthropic's shape)."""
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def router(backend: Backend, dependencies: list) -> APIRouter:
    api = APIRouter(dependencies=dependencies)

    @api.post("/v1/messages")
    async def create(body: MessagesRequest, request: Request):
        backend.check_model(body.model)
        prepared = await backend.prepare(chat_request(body), FIELDS)
        outputs = backend.submit(prepared)
        builder = MessageBuilder(new_id("msg"), backend.model_name, Answer(backend.model, prepared))
        if body.stream:
            async def events():
                try:
                    async for _, out in outputs:
                        for event in builder.push(out):
                            yield event
                except APIError as e:
                    for event in builder.failed(e.message):
                        yield event

            return backend.stream(request.url.path, events(), outputs)
        if not await backend.collect(request, outputs, lambda _, out: builder.push(out)):
            return Response(status_code=499)
        backend.answered(request.url.path)
        return builder.message()

    @api.post("/v1/messages/count_tokens")
    async def count_tokens(body: CountTokensRequest, request: Request):
        backend.check_model(body.model)
        prepared = await backend.prepare(chat_request(body, max_tokens=1), FIELDS)
        backend.answered(request.url.path)
        return {"input_tokens": len(prepared.jobs[0].prompt_ids)}

    return api


# ---- the request as a chat request ------------------------------------------------------------

def chat_request(body: CountTokensRequest, max_tokens: int | None = None) -> dict:
    messages = _system(body.system) + [m for i, message in enumerate(body.messages)
                                       for m in _messages(message.role, message.content, f"messages.{i}.content")]
    chat: dict = {"messages": messages}
    if isinstance(body, MessagesRequest):
        chat.update(max_completion_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                    top_k=body.top_k, stop=body.stop_sequences)
        max_tokens = body.max_tokens
    else:
        chat["max_completion_tokens"] = max_tokens
    tools = _tools(body.tools)
    if tools:
        chat["tools"] = tools
    chat["tool_choice"] = _tool_choice(body.tool_choice)
    thinking, output = body.thinking, body.output_config
    if thinking is not None and thinking.type == "enabled":
        if thinking.budget_tokens is None:
            raise APIError(400, "thinking.budget_tokens: a required field is missing", param="thinking.budget_tokens")
        if isinstance(body, MessagesRequest) and thinking.budget_tokens >= max_tokens:
            raise APIError(400, f"thinking.budget_tokens: must be less than max_tokens ({max_tokens}), got "
                                f"{thinking.budget_tokens}", param="thinking.budget_tokens")
        chat["chat_template_kwargs"] = {"enable_thinking": True}
        chat["thinking_budget"] = thinking.budget_tokens
    elif thinking is not None and thinking.type == "adaptive":
        if output is not None and output.effort is not None:
            chat["reasoning_effort"] = _EFFORTS.get(output.effort, output.effort)
        else:
            chat["chat_template_kwargs"] = {"enable_thinking": True}
    if output is not None and output.format is not None:
        fmt = output.format
        if fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
            raise APIError(400, "output_config.format: must be {\"type\": \"json_schema\", \"schema\": {...}}",
                           param="output_config.format")
        chat["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}
    return {k: v for k, v in chat.items() if v is not None}


def _system(system) -> list[dict]:
    if system is None:
        return []
    if isinstance(system, str):
        return [{"role": "system", "content": system}] if system else []
    parts = []
    for i, block in enumerate(system):
        if block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise APIError(400, f"system.{i}: system blocks must be text blocks", param=f"system.{i}")
        parts.append({"type": "text", "text": block["text"]})
    return [{"role": "system", "content": parts}] if parts else []  # the template joins the parts


def _messages(role: str, content, where: str) -> list[dict]:
    """One Anthropic message as chat messages: an assistant's thinking, text and tool_use blocks make one
    assistant message; a user's tool_result blocks become tool messages, followed by its other blocks."""
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    parts, calls, results, thoughts = [], [], [], []
    for j, block in enumerate(content):
        at = f"{where}.{j}"
        kind = block.get("type")
        if kind == "text":
            if not isinstance(block.get("text"), str):
                raise APIError(400, f"{at}.text: a string is needed", param=f"{at}.text")
            parts.append({"type": "text", "text": block["text"]})
        elif kind == "image" and role == "user":
            parts.append({"type": "image_url", "image_url": {"url": _image_url(block.get("source"), at)}})
        elif kind == "tool_result" and role == "user":
            if not isinstance(block.get("tool_use_id"), str):
                raise APIError(400, f"{at}.tool_use_id: a string is needed", param=f"{at}.tool_use_id")
            results.append({"role": "tool", "tool_call_id": block["tool_use_id"],
                            "content": _result_text(block.get("content"), f"{at}.content")})
        elif kind == "tool_use" and role == "assistant":
            if not isinstance(block.get("name"), str) or not isinstance(block.get("input"), dict):
                raise APIError(400, f"{at}: a tool_use block needs a name and an input object", param=at)
            calls.append({"id": block.get("id"), "type": "function",
                          "function": {"name": block["name"], "arguments": block["input"]}})
        elif kind == "thinking" and role == "assistant":
            thoughts.append(str(block.get("thinking", "")))
        elif kind == "redacted_thinking" and role == "assistant":
            continue  # encrypted thoughts of another model: nothing to show this one
        else:
            raise APIError(400, f"{at}.type: {kind!r} blocks are not supported in {role} messages (user: text, image, "
                                "tool_result; assistant: text, thinking, tool_use)", param=f"{at}.type")
    if role == "assistant":
        message: dict = {"role": "assistant", "content": parts or (None if calls else "")}
        if calls:
            message["tool_calls"] = calls
        if thoughts:
            message["reasoning_content"] = "".join(thoughts)
        return [message]
    return results + ([{"role": "user", "content": parts}] if parts or not results else [])


def _image_url(source, where: str) -> str:
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64" and isinstance(source.get("data"), str) and isinstance(source.get("media_type"), str):
        return f"data:{source['media_type']};base64,{source['data']}"
    if kind == "url" and isinstance(source.get("url"), str):
        return source["url"]  # fetched only where the server allows remote images (prepare.py)
    raise APIError(400, f"{where}.source: an image source must be base64 (media_type, data) or url; file sources "
                        "are not supported", param=f"{where}.source")


def _result_text(content, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(b, dict) and b.get("type") == "text" for b in content):
        return "".join(str(b.get("text", "")) for b in content)
    raise APIError(400, f"{where}: tool results must be text (images and documents in tool results are not "
                        "supported)", param=where)


def _tools(tools) -> list[dict] | None:
    if not tools:
        return None
    out = []
    for i, tool in enumerate(tools):
        if tool.get("type") not in (None, "custom") or not isinstance(tool.get("input_schema"), dict):
            raise APIError(400, f"tools.{i}: {tool.get('type') or tool.get('name')!r} is a server tool, which this "
                                "server does not run; only client tools (name, input_schema) are supported",
                           param=f"tools.{i}")
        if not isinstance(tool.get("name"), str):
            raise APIError(400, f"tools.{i}.name: a tool needs a name", param=f"tools.{i}.name")
        function = {"name": tool["name"], "description": tool.get("description"), "parameters": tool["input_schema"]}
        out.append({"type": "function", "function": {k: v for k, v in function.items() if v is not None}})
    return out


def _tool_choice(choice) -> str | dict | None:
    if choice is None:
        return None
    kind = choice.get("type")
    if kind in ("auto", "none"):
        return kind
    if kind == "any":
        return "required"
    if kind == "tool":
        if not isinstance(choice.get("name"), str):
            raise APIError(400, "tool_choice.name: the tool to call is needed", param="tool_choice.name")
        return {"type": "function", "function": {"name": choice["name"]}}
    raise APIError(400, f"tool_choice.type: must be auto, any, tool or none, got {kind!r}", param="tool_choice.type")
