"""An OpenAI request body turned into engine jobs: prompt ids, sampling parameters, constraints.

Every check of a request's meaning lives here and raises APIError (400) naming the field, so the
engine only ever sees requests it can run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..chat import ChatTemplateError, has_tool_format
from ..sampling import SamplingParams
from .errors import APIError
from .schema import ChatCompletionRequest, CompletionRequest, NamedToolChoice

# Template variables a client may not set through chat_template_kwargs (the server sets them).
_RESERVED = {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token", "template", "family"}
# reasoning_effort -> thinking budget: fourfold steps from Anthropic's smallest budget (1024); high still
# ends the runaway thoughts users report, with room left for hard problems
EFFORT_BUDGETS = {"low": 1024, "medium": 4096, "high": 16384}
_THINKING_OFF = {"none", "minimal"}
# the request fields a thinking budget may come in: ours, vLLM's, llama-server's two
BUDGET_FIELDS = ("thinking_budget", "thinking_token_budget", "thinking_budget_tokens", "reasoning_budget_tokens")


@dataclass
class Job:
    prompt_ids: list[int]
    params: SamplingParams
    logprobs: int | None = None
    constraint: object | None = None
    prompt_text: str = ""
    soft: list = field(default_factory=list)  # image soft tokens: (offset in prompt_ids, [n, hidden])


@dataclass
class Prepared:
    jobs: list[Job]
    family: str
    logprobs: bool = False
    echo: bool = False
    n: int = 1
    tool_names: set[str] = field(default_factory=set)  # the tools declared: only calls of these end in "tool_calls"


MAX_REMOTE_IMAGE_BYTES = 20 * 1024 * 1024


def _check_parts(messages: list[dict], fetch_remote: bool) -> None:
    """Content parts a client may send: text, image_url and input_audio. A data: URL is decoded later; an http(s) URL
    is fetched here only when the server allows it (a server fetching any URL it is given is a
    request-forgery hole), and never a local path."""
    for i, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            where = f"messages.{i}.content.{j}"
            kind = part.get("type")
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise APIError(400, f"{where}.text: a text part needs a string", param=where)
                continue
            if kind == "input_audio":  # decoded later, with the other media
                audio = part.get("input_audio")
                if not isinstance(audio, dict) or not isinstance(audio.get("data"), str):
                    raise APIError(400, f"{where}.input_audio.data: base64-encoded audio is needed", param=where)
                continue
            if kind != "image_url":
                raise APIError(400, f"{where}.type: {kind!r} parts are not accepted (use text, image_url or "
                                    "input_audio)", param=where)
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise APIError(400, f"{where}.image_url.url: a URL string is needed", param=where)
            scheme = url.split(":", 1)[0].lower()
            if scheme in ("http", "https"):
                if not fetch_remote:
                    raise APIError(400, f"{where}: remote image URLs are not fetched by this server (started "
                                        "without --allow-remote-images); send the image as a data: URL", param=where)
                content[j] = {"type": "image", "image": _fetch(url, where)}


def _fetch(url: str, where: str) -> bytes:
    import httpx

    try:
        with httpx.stream("GET", url, timeout=15, follow_redirects=True) as r:
            r.raise_for_status()
            data = bytearray()
            for piece in r.iter_bytes():
                data += piece
                if len(data) > MAX_REMOTE_IMAGE_BYTES:
                    raise APIError(400, f"{where}: the image at {url} is larger than "
                                        f"{MAX_REMOTE_IMAGE_BYTES // 2**20} MiB", param=where)
            return bytes(data)
    except httpx.HTTPError as e:
        raise APIError(400, f"{where}: could not fetch {url}: {e}", param=where) from None


def prepare_chat(model, body: ChatCompletionRequest, fetch_remote: bool = False) -> Prepared:
    family = model.config.architecture
    if not body.messages:
        raise APIError(400, "messages: at least one message is needed", param="messages")
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    _check_parts(messages, fetch_remote)
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    choice = body.tool_choice
    forced, forced_name = False, None  # a call the answer must be (tool_choice required or named)
    if tools and not has_tool_format(family):
        raise APIError(400, f"tools: this model ({family}) has no tool-call format", param="tools")
    if choice is not None and choice != "none" and not tools:
        raise APIError(400, "tool_choice: needs tools", param="tool_choice")
    if choice == "none":
        tools = None  # the model is not told of them, so it cannot call them
    elif choice == "required":
        forced = True
    elif isinstance(choice, NamedToolChoice):
        names = {t["function"]["name"] for t in tools}
        if choice.function.name not in names:
            raise APIError(400, f"tool_choice: no tool named {choice.function.name!r}", param="tool_choice")
        forced, forced_name = True, choice.function.name
    if forced and _constrained(body.response_format):
        raise APIError(400, "response_format: cannot be combined with a forced tool call", param="response_format")

    kwargs = dict(body.chat_template_kwargs or {})
    thinking, budget = _thinking(model, body, kwargs.pop("enable_thinking", None))
    if thinking and _constrained(body.response_format):
        raise APIError(400, "response_format: cannot be combined with thinking (the thoughts are free text)",
                       param="response_format")
    for key in list(kwargs):
        if key in _RESERVED:
            raise APIError(400, f"chat_template_kwargs: {key!r} is set by the server", param="chat_template_kwargs")
    try:
        prompt = model.chat_input(messages, tools=tools, enable_thinking=thinking, local_files=False, **kwargs)
        soft = model.media_embeddings(prompt)  # media through their towers, here and not on the engine thread
    except ChatTemplateError as e:
        raise APIError(400, str(e), param="messages") from None
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from None
    ids = list(prompt.ids) if hasattr(prompt, "ids") else prompt

    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs: needs logprobs to be true", param="top_logprobs")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    prompts = [(ids, "")] * body.n
    if forced:
        constraint = _call_constraint(model, tools, forced_name, thinking)
    else:
        constraint = lambda: _constraint(body.response_format, model.tokenizer)  # noqa: E731
    jobs = _jobs(model, body, prompts, max_tokens, param, logprobs, constraint, thinking_budget=budget)
    for job in jobs:
        job.soft = soft
    return Prepared(jobs, family, logprobs=body.logprobs, n=body.n,
                    tool_names={t["function"]["name"] for t in tools or []})


def _thinking(model, body: ChatCompletionRequest, enable) -> tuple[bool, int | None]:
    """(whether the template opens thinking, the thinking budget) from chat_template_kwargs.enable_thinking,
    reasoning_effort and the budget fields. A budget turns thinking on (0 turns it off); an effort sets
    a budget where no field does."""
    given = {name: getattr(body, name) for name in BUDGET_FIELDS if getattr(body, name) is not None}
    if len(set(given.values())) > 1:
        raise APIError(400, f"{', '.join(given)}: give the thinking budget once (they disagree)", param=next(iter(given)))
    name, budget = next(iter(given.items()), ("thinking_budget", None))
    budget = None if budget == -1 else budget
    effort = body.reasoning_effort
    off = effort in _THINKING_OFF or (enable is not None and not enable)
    if budget and off:
        raise APIError(400, f"{name}: thinking is turned off by " + ("reasoning_effort" if effort in _THINKING_OFF else
                                                                     "chat_template_kwargs.enable_thinking"), param=name)
    if budget is not None and model.thought_tokens is None:
        raise APIError(400, f"{name}: this model ({model.config.architecture}) has no thought channel", param=name)
    thinking = bool(enable) or effort in EFFORT_BUDGETS or bool(budget)
    if budget == 0:
        return False, None  # as llama-server's budget 0: the template's answer-at-once prompt
    if budget is None and effort in EFFORT_BUDGETS and model.thought_tokens is not None:
        budget = EFFORT_BUDGETS[effort]
    return thinking, budget if thinking else None


def _call_constraint(model, tools: list[dict], name: str | None, thinking: bool) -> Callable[[], object]:
    """Fresh constraints of a forced tool call, one per sequence (the grammar checked now: a 400 here)."""
    from ..tool_grammar import tool_call_constraint

    def make():
        try:
            return tool_call_constraint(tools, name, model.tokenizer, thinking)
        except ValueError as e:
            raise APIError(400, str(e), param="tools") from None

    make()
    return make


def prepare_completion(model, body: CompletionRequest) -> Prepared:
    prompt = body.prompt
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt: is empty", param="prompt")
    pairs = []
    for p in prompt:
        if isinstance(p, str):
            if not p:
                raise APIError(400, "prompt: is empty", param="prompt")
            pairs.append((model.tokenizer.encode(p, add_special_tokens=True), p))
        else:
            if not p:
                raise APIError(400, "prompt: is empty", param="prompt")
            if min(p) < 0 or max(p) >= model.config.vocab_size:
                raise APIError(400, f"prompt: token id out of range [0, {model.config.vocab_size})", param="prompt")
            pairs.append((list(p), model.tokenizer.decode(p)))
    if body.echo and body.logprobs is not None:
        raise APIError(400, "echo: prompt logprobs are not supported; use echo or logprobs", param="echo")
    prompts = [pair for pair in pairs for _ in range(body.n)]
    jobs = _jobs(model, body, prompts, body.max_tokens, "max_tokens", body.logprobs,
                 lambda: _constraint(body.response_format, model.tokenizer), default_max=16)
    return Prepared(jobs, model.config.architecture, logprobs=body.logprobs is not None, echo=body.echo, n=body.n)


def _jobs(model, body, prompts: list[tuple[list[int], str]], max_tokens: int | None, param: str,
          logprobs: int | None, constraint: Callable[[], object], default_max: int | None = None,
          thinking_budget: int | None = None) -> list[Job]:
    """One job per prompt; constraint() makes each its own grammar constraint (or None)."""
    context = model.config.max_position_embeddings
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    jobs = []
    for i, (ids, text) in enumerate(prompts):
        room = context - len(ids)
        if room <= 0:
            raise APIError(400, f"the prompt has {len(ids)} tokens; the model's context is {context} tokens",
                           param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
                           code="context_length_exceeded")
        n = max_tokens if max_tokens is not None else min(room, default_max or room)
        if n <= 0:
            raise APIError(400, f"{param}: must be at least 1, got {n}", param=param)
        if n > room:
            raise APIError(400, f"{param}: the prompt has {len(ids)} tokens and the context is {context}, so at "
                                f"most {room} can be generated; {n} were asked for", param=param,
                           code="context_length_exceeded")
        sampling = {k: v for k, v in dict(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                                          min_p=body.min_p).items() if v is not None}
        seed = None if body.seed is None else body.seed + i
        try:
            params = SamplingParams(max_tokens=n, seed=seed, stop=stop, presence_penalty=body.presence_penalty,
                                    frequency_penalty=body.frequency_penalty, thinking_budget=thinking_budget,
                                    **sampling)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        jobs.append(Job(ids, params, logprobs, constraint(), text))
    return jobs


def _constrained(response_format: dict | None) -> bool:
    return bool(response_format) and response_format.get("type") != "text"


def _constraint(response_format: dict | None, tokenizer):
    """A fresh grammar constraint for one sequence, or None for free text."""
    if not _constrained(response_format):
        return None
    from ..structured import constraint_from_response_format

    try:
        return constraint_from_response_format(response_format, tokenizer)
    except ValueError as e:
        raise APIError(400, str(e), param="response_format") from None
