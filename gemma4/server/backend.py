"""What every HTTP API shares: the model and its name, and running prepared requests on the one engine.

Each API translates its request into engine jobs (prepare.py), hands them over here, and reads the
outputs back as an async iterator; streaming and disconnects are handled the same way for all of them.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from ..engine import Engine, QueueFull, Request as EngineRequest, RequestOutput, TooLarge
from .errors import APIError, validation_message
from .metrics import Metrics
from .prepare import Prepared, prepare_chat
from .schema import ChatCompletionRequest

RETRY_AFTER_S = 2
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Backend:
    def __init__(self, model, model_name: str, engine: Engine, metrics: Metrics, allow_remote_images: bool):
        self.model, self.model_name, self.engine, self.metrics = model, model_name, engine, metrics
        self.allow_remote_images = allow_remote_images
        self.created = int(time.time())

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           "not_found_error", "model", "model_not_found")

    def answered(self, path: str) -> None:
        self.metrics.requests.labels(path, "200").inc()

    async def prepare(self, chat: dict, fields: dict[str, str]) -> Prepared:
        """A chat request built by another API, prepared as chat completions prepares its own; an error
        names the field as that API spells it (`fields`: chat field -> the API's field)."""
        try:
            body = ChatCompletionRequest.model_validate(chat)
            return await run_in_threadpool(prepare_chat, self.model, body, self.allow_remote_images)
        except ValidationError as e:
            message, param = validation_message(e.errors())
            raise renamed(APIError(400, message, param=param), fields) from None
        except APIError as e:
            raise renamed(e, fields) from None

    def submit(self, prepared: Prepared) -> "Outputs":
        """Hands the jobs to the engine. An APIError raised here is counted in the metrics by its handler."""
        engine = self.engine
        if engine.error is not None:
            raise APIError(503, "the engine failed; restart the server", "server_error")
        if engine.queue_depth + len(prepared.jobs) > engine.max_queue:
            raise busy()
        outputs = Outputs(engine, self.metrics)
        for i, job in enumerate(prepared.jobs):
            req = EngineRequest(job.prompt_ids, job.params, outputs.emitter(i), logprobs=job.logprobs,
                                constraint=job.constraint, soft=job.soft)
            try:
                engine.submit(req)
            except TooLarge as e:
                outputs.cancel()
                raise APIError(400, str(e), code="context_length_exceeded") from None
            except QueueFull:
                outputs.cancel()
                raise busy() from None
            outputs.requests.append(req)
            self.metrics.prompt_tokens.inc(len(job.prompt_ids))
        return outputs

    async def collect(self, request: Request, outputs: "Outputs",
                      push: Callable[[int, RequestOutput], object]) -> bool:
        """Feeds every output to push(index, output) until all are finished; False when the client went
        away first (its requests are then cancelled)."""
        async def drain():
            async for index, out in outputs:
                push(index, out)

        try:
            task = asyncio.ensure_future(drain())
            while not task.done():
                await asyncio.wait({task}, timeout=0.5)
                if not task.done() and await request.is_disconnected():
                    task.cancel()
                    return False
            task.result()
        finally:
            outputs.cancel()
        return True

    def stream(self, path: str, events: AsyncIterator[bytes], outputs: "Outputs") -> StreamingResponse:
        """Server-sent events; a client that goes away frees its rows."""
        async def body():
            try:
                async for event in events:
                    yield event
                self.answered(path)
            finally:
                outputs.cancel()

        return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)


class Mailbox:
    """Wakes the event loop for outputs the engine thread emits: one wake-up (a write to the loop's self-pipe)
    per burst, however many requests got outputs in the step, rather than one per output."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.dirty: collections.deque = collections.deque()
        self.scheduled = False

    def post(self, outputs: "Outputs") -> None:  # on the engine thread
        self.dirty.append(outputs)
        if not self.scheduled:  # cleared by deliver() before it drains: a later post schedules anew
            self.scheduled = True
            self.loop.call_soon_threadsafe(self.deliver)

    def deliver(self) -> None:  # on the loop
        self.scheduled = False
        while self.dirty:
            self.dirty.popleft().ready.set()


_mailboxes: dict[asyncio.AbstractEventLoop, Mailbox] = {}


def mailbox(loop: asyncio.AbstractEventLoop) -> Mailbox:
    box = _mailboxes.get(loop)
    if box is None:
        _mailboxes.clear()  # one loop serves at a time; a new one (tests) replaces the old
        box = _mailboxes[loop] = Mailbox(loop)
    return box


class Outputs:
    """The outputs of one HTTP request's engine requests: an async iterator of (index, output), or of the
    lists of them that arrived together (batches(): a step's outputs framed and written at once)."""

    def __init__(self, engine: Engine, metrics: Metrics):
        self.engine, self.metrics = engine, metrics
        self.mailbox = mailbox(asyncio.get_running_loop())
        self.pending: collections.deque = collections.deque()  # appended on the engine thread
        self.ready = asyncio.Event()
        self.requests: list[EngineRequest] = []
        self.started = time.monotonic()
        self.first_seen: set[int] = set()
        self.open = 0

    def emitter(self, index: int):
        self.open += 1
        pending, post = self.pending, self.mailbox.post

        def emit(out: RequestOutput) -> None:  # on the engine thread
            pending.append((index, out))
            post(self)

        return emit

    def __aiter__(self):
        return self._iterate()

    async def _iterate(self):
        async for batch in self.batches():
            for item in batch:
                yield item

    async def batches(self):
        while self.open:
            if not self.pending:
                self.ready.clear()
                if not self.pending:  # an output that came between the check and the clear is seen here
                    await self.ready.wait()
                continue
            batch = []
            while self.pending and self.open:
                index, out = self.pending.popleft()
                if index not in self.first_seen:
                    self.first_seen.add(index)
                    self.metrics.ttft.observe(time.monotonic() - self.started)
                if out.token_id is not None:
                    self.metrics.generated_tokens.inc()
                if out.finished:
                    self.open -= 1
                if out.finish_reason == "error":
                    raise APIError(500, "the engine failed while generating", "server_error")
                batch.append((index, out))
            yield batch

    def cancel(self) -> None:
        for r in self.requests:
            self.engine.cancel(r)


def busy() -> APIError:
    return APIError(503, "the server is busy: too many requests waiting; retry later", "server_error",
                    headers={"Retry-After": str(RETRY_AFTER_S)})


def renamed(e: APIError, fields: dict[str, str]) -> APIError:
    """The error with the chat field it names (as param and as the message's first word) respelled."""
    if e.param is None:
        return e
    head, _, rest = e.param.partition(".")
    if head not in fields:
        return e
    param = fields[head] + ("." + rest if rest else "")
    message = e.message
    if message.startswith(e.param):
        message = param + message[len(e.param):]
    return APIError(e.status, message, e.type, param, e.code, e.headers)
