"""OpenAI's Responses API: POST /v1/responses, GET and DELETE /v1/responses/{id}.

A request is translated into the internal chat request (the messages, tools and settings chat
completions takes) and prepared and run exactly as chat completions are, so the three APIs share the
engine, its batching and its prefix reuse. Stored responses are kept in memory, a bounded number of them,
for previous_response_id; one that is gone is refused with a 400 that says so.
"""

from __future__ import annotations

from collections import OrderedDict

from fastapi import APIRouter, Request
from fastapi.responses import Response

from .answer import Answer
from .backend import Backend
from .errors import APIError
from .responses_events import ResponseBuilder, new_id
from .responses_schema import ResponseRequest

# chat request field -> how this API spells it, for errors raised while preparing
FIELDS = {"messages": "input", "max_completion_tokens": "max_output_tokens", "response_format": "text.format",
          "reasoning_effort": "reasoning.effort"}
_EFFORTS = {"xhigh": "high", "max": "high"}  # efforts past Gemma's highest are its highest
_TEXT_PARTS = ("input_text", "output_text", "text", "refusal")


class ResponseStore:
    """Stored responses, the oldest dropped first past `kept`: each with the conversation so far (as
    chat messages, the instructions left out: they are not carried over) to continue from."""

    def __init__(self, kept: int):
        self.kept = kept
        self.entries: OrderedDict[str, tuple[dict, list[dict]]] = OrderedDict()

    def put(self, rid: str, response: dict, messages: list[dict]) -> None:
        self.entries[rid] = (response, messages)
        while len(self.entries) > self.kept:
            self.entries.popitem(last=False)

    def get(self, rid: str) -> tuple[dict, list[dict]] | None:
        entry = self.entries.get(rid)
        if entry is not None:
            self.entries.move_to_end(rid)  # a conversation in use is the last to go
        return entry


def router(backend: Backend, dependencies: list, kept: int) -> APIRouter:
    api = APIRouter(dependencies=dependencies)
    store = ResponseStore(kept)

    @api.post("/v1/responses")
    async def create(body: ResponseRequest, request: Request):
        backend.check_model(body.model)
        _refuse_unsupported(body)
        history: list[dict] = []
        if body.previous_response_id is not None:
            entry = store.get(body.previous_response_id)
            if entry is None:
                raise APIError(400, f"previous_response_id: the response {body.previous_response_id!r} is not "
                                    f"stored here (it was never stored, was sent with store=false, was deleted, "
                                    f"or is older than the {kept} this server keeps); send the whole "
                                    f"conversation as input instead", param="previous_response_id",
                               code="previous_response_not_found")
            history = entry[1]
        new = input_messages(body.input)
        if not history and not new:
            raise APIError(400, "input: is empty", param="input")
        system = [{"role": "system", "content": body.instructions}] if body.instructions else []
        prepared = await backend.prepare(chat_request(body, system + history + new), FIELDS)
        outputs = backend.submit(prepared)
        summary = bool(body.reasoning and (body.reasoning.summary or body.reasoning.generate_summary))
        builder = ResponseBuilder(new_id("resp"), _echo(body, backend.model_name), Answer(backend.model, prepared),
                                  summary)

        def keep() -> None:
            if body.store:
                store.put(builder.id, builder.response(), history + new + [builder.history()])

        if body.stream:
            async def events():
                for event in builder.opening():
                    yield event
                try:
                    async for _, out in outputs:
                        for event in builder.push(out):
                            yield event
                except APIError as e:
                    for event in builder.failed(e.message):
                        yield event
                    return
                keep()

            return backend.stream(request.url.path, events(), outputs)
        if not await backend.collect(request, outputs, lambda _, out: builder.push(out)):
            return Response(status_code=499)
        keep()
        backend.answered(request.url.path)
        return builder.response()

    @api.get("/v1/responses/{rid}")
    async def retrieve(rid: str):
        entry = store.get(rid)
        if entry is None:
            raise APIError(404, f"no stored response with id {rid!r}", "not_found_error", "response_id")
        return entry[0]

    @api.delete("/v1/responses/{rid}")
    async def delete(rid: str):
        if store.entries.pop(rid, None) is None:
            raise APIError(404, f"no stored response with id {rid!r}", "not_found_error", "response_id")
        return {"id": rid, "object": "response", "deleted": True}

    return api


def _refuse_unsupported(body: ResponseRequest) -> None:
    if body.background:
        raise APIError(400, "background: background responses are not supported; leave it out", param="background")
    if body.conversation is not None:
        raise APIError(400, "conversation: conversation objects are not supported; use previous_response_id",
                       param="conversation")
    if body.prompt is not None:
        raise APIError(400, "prompt: stored prompt templates are not supported; send instructions and input",
                       param="prompt")


# ---- the request as a chat request ------------------------------------------------------------

def chat_request(body: ResponseRequest, messages: list[dict]) -> dict:
    chat = {"messages": messages, "max_completion_tokens": body.max_output_tokens, "temperature": body.temperature,
            "top_p": body.top_p, "top_k": body.top_k, "min_p": body.min_p, "seed": body.seed}
    tools = _tools(body.tools)
    if tools:
        chat["tools"] = tools
    choice = _tool_choice(body.tool_choice, tools)
    if isinstance(choice, tuple):  # allowed_tools: a subset of the tools, and a mode
        chat["tools"], choice = choice
    if choice is not None:
        chat["tool_choice"] = choice
    if body.reasoning is not None and body.reasoning.effort is not None:
        chat["reasoning_effort"] = _EFFORTS.get(body.reasoning.effort, body.reasoning.effort)
    fmt = body.text.format if body.text is not None else None
    if fmt is not None:
        chat["response_format"] = _response_format(fmt)
    return {k: v for k, v in chat.items() if v is not None}


def input_messages(items) -> list[dict]:
    """Input items as chat messages: function_call items join the assistant message before them (or
    open one), function_call_output items become tool messages, reasoning goes to the next assistant
    message's reasoning_content."""
    if items is None:
        return []
    if isinstance(items, str):
        return [{"role": "user", "content": items}] if items else []
    out: list[dict] = []
    reasoning = None
    for i, item in enumerate(items):
        where = f"input.{i}"
        if not isinstance(item, dict):
            raise APIError(400, f"{where}: an input item must be an object", param=where)
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise APIError(400, f"{where}.role: must be user, system, developer or assistant, got {role!r}",
                               param=f"{where}.role")
            message = {"role": role, "content": _content(item.get("content"), f"{where}.content")}
            if role == "assistant" and reasoning is not None:
                message["reasoning_content"], reasoning = reasoning, None
            out.append(message)
        elif kind == "function_call":
            for key in ("call_id", "name", "arguments"):
                if not isinstance(item.get(key), str):
                    raise APIError(400, f"{where}.{key}: a string is needed", param=f"{where}.{key}")
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
                if reasoning is not None:
                    out[-1]["reasoning_content"], reasoning = reasoning, None
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise APIError(400, f"{where}.call_id: a string is needed", param=f"{where}.call_id")
            out.append({"role": "tool", "tool_call_id": item["call_id"],
                        "content": _tool_output(item.get("output"), f"{where}.output")})
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            reasoning = "".join(p.get("text", "") for p in parts if isinstance(p, dict))
        else:
            raise APIError(400, f"{where}.type: {kind!r} input items are not supported here (message, "
                                "function_call, function_call_output and reasoning are)", param=f"{where}.type")
    return out


def _content(content, where: str):
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where}: a string or a list of content parts is needed", param=where)
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _TEXT_PARTS:
            text = part.get("refusal") if kind == "refusal" else part.get("text")
            if not isinstance(text, str):
                raise APIError(400, f"{where}.{j}.text: a string is needed", param=f"{where}.{j}")
            parts.append({"type": "text", "text": text})
        elif kind == "input_image":
            url = part.get("image_url")
            if not isinstance(url, str):
                raise APIError(400, f"{where}.{j}: an input_image needs image_url (a data: URL or, where the "
                                    "server allows it, an http(s) URL); file_id is not supported", param=f"{where}.{j}")
            parts.append({"type": "image_url", "image_url": {"url": url}})
        else:
            raise APIError(400, f"{where}.{j}.type: {kind!r} content parts are not supported (input_text, "
                                "output_text and input_image are)", param=f"{where}.{j}.type")
    return parts


def _tool_output(output, where: str) -> str:
    if isinstance(output, str):
        return output
    if isinstance(output, list) and all(isinstance(p, dict) and p.get("type") == "input_text" for p in output):
        return "".join(str(p.get("text", "")) for p in output)
    raise APIError(400, f"{where}: a string or a list of input_text parts is needed (images and files in tool "
                        "output are not supported)", param=where)


def _tools(tools) -> list[dict] | None:
    if not tools:
        return None
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type")
        if kind != "function":
            raise APIError(400, f"tools.{i}.type: {kind!r} tools are not supported by this server; only function "
                                "tools (the model calls them, the client runs them)", param=f"tools.{i}.type")
        if not isinstance(tool.get("name"), str):
            raise APIError(400, f"tools.{i}.name: a function tool needs a name", param=f"tools.{i}.name")
        function = {"name": tool["name"], "description": tool.get("description"), "parameters": tool.get("parameters")}
        out.append({"type": "function", "function": {k: v for k, v in function.items() if v is not None}})
    return out


def _tool_choice(choice, tools: list[dict] | None):
    if choice is None or isinstance(choice, str):
        return choice
    kind = choice.get("type")
    if kind == "function":
        if not isinstance(choice.get("name"), str):
            raise APIError(400, "tool_choice.name: the function to call is needed", param="tool_choice.name")
        return {"type": "function", "function": {"name": choice["name"]}}
    if kind == "allowed_tools":
        names = {t.get("name") for t in choice.get("tools") or [] if isinstance(t, dict)}
        allowed = [t for t in tools or [] if t["function"]["name"] in names]
        if not allowed:
            raise APIError(400, "tool_choice.tools: none of the allowed tools is among tools", param="tool_choice")
        mode = choice.get("mode", "auto")
        if mode not in ("auto", "required"):
            raise APIError(400, f"tool_choice.mode: must be auto or required, got {mode!r}", param="tool_choice.mode")
        return allowed, mode
    raise APIError(400, f"tool_choice.type: {kind!r} is not supported (none, auto, required, a function, or "
                        "allowed_tools)", param="tool_choice")


def _response_format(fmt: dict) -> dict:
    kind = fmt.get("type")
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise APIError(400, "text.format.schema: a JSON schema object is needed", param="text.format.schema")
        spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": {"name": "output", **spec}}
    if kind in ("text", "json_object"):
        return {"type": kind}
    raise APIError(400, f"text.format.type: must be text, json_object or json_schema, got {kind!r}",
                   param="text.format.type")


def _echo(body: ResponseRequest, model_name: str) -> dict:
    """The request's settings, as the response object repeats them."""
    reasoning = body.reasoning
    fmt = body.text.format if body.text is not None and body.text.format else {"type": "text"}
    return {"model": model_name, "instructions": body.instructions, "tools": body.tools or [],
            "tool_choice": body.tool_choice or "auto", "parallel_tool_calls": body.parallel_tool_calls is not False,
            "temperature": body.temperature, "top_p": body.top_p, "max_output_tokens": body.max_output_tokens,
            "previous_response_id": body.previous_response_id, "store": body.store,
            "reasoning": {"effort": reasoning.effort if reasoning else None,
                          "summary": (reasoning.summary or reasoning.generate_summary) if reasoning else None},
            "text": {"format": fmt}, "truncation": body.truncation or "disabled", "metadata": body.metadata or {},
            "user": body.user}
