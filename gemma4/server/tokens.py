"""/tokenize and /detokenize as llama-server and vLLM spell them, and the model card /v1/models gives.

llama-server: POST /tokenize {"content", "add_special" (default false), "with_pieces"} -> {"tokens"};
/detokenize {"tokens"} -> {"content"}. vLLM: /tokenize {"prompt" | "messages", "add_special_tokens"
(default true)} -> {"tokens", "count", "max_model_len"}; /detokenize -> {"prompt"}. One answer carries
both spellings' keys, so either client reads it."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ..chat import has_tool_format
from .errors import APIError
from .schema import Message, _Body


class TokenizeRequest(_Body):
    model: str | None = None
    content: str | None = None  # llama-server
    prompt: str | None = None  # vLLM: text
    messages: list[Message] | None = None  # vLLM: a conversation, through the chat template
    add_generation_prompt: bool = True
    add_special: bool | None = None
    add_special_tokens: bool | None = None
    with_pieces: bool = False
    return_token_strs: bool = False


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


def capabilities(model) -> list[str]:
    """What the model can do, as Ollama names it (and "chat")."""
    caps = ["completion"]
    if model.tokenizer is not None:
        caps.append("chat")
    if model.vision_checkpoint is not None:
        caps.append("vision")
    if has_tool_format(model.config.architecture):
        caps.append("tools")
    if model.thought_tokens is not None:
        caps.append("thinking")
    return caps


def model_card(backend) -> dict:
    """A /v1/models entry: OpenAI's fields, vLLM's max_model_len, llama-server's meta, Ollama's capabilities."""
    model, cfg = backend.model, backend.model.config
    meta: dict[str, Any] = {"n_vocab": cfg.vocab_size, "n_ctx_train": cfg.max_position_embeddings,
                            "n_embd": cfg.hidden_size, "n_params": cfg.parameter_counts()[0]}
    weight_bytes = getattr(model.checkpoint, "weight_bytes", None)
    if weight_bytes is not None:
        meta["size"] = weight_bytes()
    return {"id": backend.model_name, "object": "model", "created": backend.created, "owned_by": "gemma4",
            "max_model_len": cfg.max_position_embeddings, "capabilities": capabilities(model), "meta": meta}


def _piece(tokenizer, token_id: int, byte_ids: set[int]) -> str | list[int]:
    """A token's text, or (a byte token, part of a UTF-8 character) its byte as llama-server gives it."""
    if token_id in byte_ids:
        text = tokenizer.id_to_token(token_id) or ""
        if text.startswith("<0x") and text.endswith(">"):
            return [int(text[3:-1], 16)]
    return tokenizer.decode([token_id])


def router(backend, dependencies: list) -> APIRouter:
    api = APIRouter(dependencies=dependencies)
    model = backend.model

    def tokenizer():
        if model.tokenizer is None:
            raise APIError(400, "this model has no tokenizer")
        return model.tokenizer

    @api.post("/tokenize")
    def tokenize(body: TokenizeRequest):  # a plain def: FastAPI runs it on a worker thread
        backend.check_model(body.model)
        tok = tokenizer()
        given = [k for k in ("content", "prompt", "messages") if getattr(body, k) is not None]
        if len(given) != 1:
            raise APIError(400, "give one of content (llama-server), prompt or messages (vLLM)"
                           + (f", not {' and '.join(given)}" if given else ""))
        add_special = body.add_special if body.add_special is not None else body.add_special_tokens
        if body.messages is not None:
            if not body.messages:
                raise APIError(400, "messages: at least one message is needed", param="messages")
            try:
                prompt = model.chat_input([m.model_dump(exclude_none=True) for m in body.messages],
                                          local_files=False, add_generation_prompt=body.add_generation_prompt)
            except ValueError as e:
                raise APIError(400, f"messages: {e}", param="messages") from None
            ids = list(getattr(prompt, "ids", prompt))  # the template writes BOS itself
        else:
            text = body.content if body.content is not None else body.prompt
            ids = tok.encode(text, add_special_tokens=add_special if add_special is not None
                             else body.prompt is not None)
        byte_ids = tok.byte_token_ids if body.with_pieces else set()
        out: dict[str, Any] = {"tokens": [{"id": i, "piece": _piece(tok, i, byte_ids)} for i in ids]
                               if body.with_pieces else ids, "count": len(ids), "max_model_len": model.config.max_position_embeddings}
        if body.return_token_strs:
            out["token_strs"] = [tok.id_to_token(i) for i in ids]
        return out

    @api.post("/detokenize")
    def detokenize(body: DetokenizeRequest):
        backend.check_model(body.model)
        tok = tokenizer()
        vocab = model.config.vocab_size
        bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"tokens: {bad} is not a token id (0 to {vocab - 1})", param="tokens")
        text = tok.decode(body.tokens)
        return {"content": text, "prompt": text}

    return api
