"""The HTTP API: OpenAI-compatible completions over the batcher, the model list, health, the page.

Routes: ``POST /v1/completions`` (OpenAI's legacy completions: JSON, or Server-Sent Events with
``stream: true`` in OpenAI's chunk format), ``GET /v1/models``, ``GET /health``, and ``GET /``,
the playground page. Errors are OpenAI's JSON shape, ``{"error": {"message", "type", "param",
"code"}}``: 400 for a bad request (naming the field), 401 for a missing or wrong API key, 404 for
an unknown model, 413 for a body over 1 MiB, 503 with ``Retry-After`` when the queue is full, 500
(without a traceback) for anything else. docs/serve.md describes the design.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import Receive, Scope, Send

from infinito.serve.batcher import Batcher, Event, Job, QueueFull
from infinito.serve.engine import Sampling

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
RETRY_AFTER_S = 1
POLL_DISCONNECT_S = 0.5


class ApiError(Exception):
    """An error answered in OpenAI's shape; ``param`` names the offending field."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "") -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """OpenAI's completion request, the fields INFINITO supports; any other field is an error."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str = Field(min_length=1)
    model: str | None = None
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0)  # 0: greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)  # 1: off
    top_k: int = Field(0, ge=0)  # 0: off (an extension, as in vLLM)
    repetition_penalty: float = Field(1.0, gt=0.0)  # 1: off (CTRL's penalty)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)  # one completion per request
    user: str | None = None  # accepted and ignored, as a client may send it


@dataclass(frozen=True)
class ServeLimits:
    """What the server admits; the batcher holds the batch and queue bounds."""

    max_tokens_cap: int
    block_size: int


@dataclass
class Service:
    """Everything the routes need: the batcher, the tokenizer and what to call the model."""

    batcher: Batcher
    tokenizer: Any
    model_id: str
    limits: ServeLimits
    api_key: str | None = None
    info: dict[str, Any] | None = None  # shown by /health (dtype, device, memory mode)


def create_app(service: Service) -> FastAPI:
    """The FastAPI app over ``service``; the batcher thread runs for the app's lifespan."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.batcher.start()
        try:
            yield
        finally:
            service.batcher.shutdown()

    app = FastAPI(title="INFINITO", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _internal_error)
    app.add_middleware(BodyLimit)
    auth = _bearer(service.api_key)

    @app.get("/health")
    async def health() -> Response:
        """200 while the decode thread takes requests, 503 once it has stopped."""
        ok = service.batcher.healthy
        body = {
            "status": "ok" if ok else "unavailable",
            "model": service.model_id,
            **(service.info or {}),
            "max_batch": service.batcher.max_batch,
            "max_queue": service.batcher.max_queue,
            **service.batcher.load(),
        }
        return JSONResponse(body, 200 if ok else 503)

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> HTMLResponse:
        return HTMLResponse(_page())

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(service.model_id)]}

    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        if body.model is not None and body.model != service.model_id:
            raise ApiError(
                404,
                f"model {body.model!r} is not served here; "
                f"GET /v1/models lists {service.model_id!r}",
                "model",
                "model_not_found",
            )
        prompt_ids = await _prompt_ids(service, body.prompt)
        job, events = _job(service, body, prompt_ids)
        try:
            service.batcher.submit(job)
        except QueueFull as e:
            raise ApiError(503, f"server busy: {e}; retry later") from e
        meta = _Meta(
            f"cmpl-{uuid.uuid4().hex}", int(time.time()), service.model_id, len(prompt_ids)
        )
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return JobStream(
                _sse(events, meta, usage),
                job,
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return JSONResponse(await _collect(events, job, request, meta))

    return app


# ---------------------------------------------------------------------- requests to jobs


async def _prompt_ids(service: Service, prompt: str) -> list[int]:
    # off the event loop: a long prompt takes a while to encode
    ids = await asyncio.to_thread(service.tokenizer.encode, prompt)
    block = service.limits.block_size
    if not ids:
        raise ApiError(400, "prompt encodes to no tokens", "prompt")
    if len(ids) > block:
        raise ApiError(
            400, f"prompt is {len(ids)} tokens; this model's context is {block} tokens", "prompt"
        )
    return ids


def _job(service: Service, body: CompletionRequest, prompt_ids: list[int]) -> tuple[Job, Any]:
    cap = service.limits.max_tokens_cap
    if body.max_tokens > cap:
        raise ApiError(
            400, f"max_tokens={body.max_tokens} is above this server's cap of {cap}", "max_tokens"
        )
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if len(stop) > 4 or not all(stop):
        raise ApiError(400, "stop takes at most 4 non-empty strings", "stop")
    sampling = Sampling(
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        top_k=body.top_k or None,
        top_p=body.top_p if body.top_p < 1.0 else None,
        repetition_penalty=body.repetition_penalty,
        seed=secrets.randbelow(2**63) if body.seed is None else body.seed,
    )
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()

    def emit(event: Event) -> None:  # called on the decode thread
        loop.call_soon_threadsafe(events.put_nowait, event)

    eos = service.tokenizer.eos_token_id
    return Job(prompt_ids, sampling, stop, eos, emit), events


# ---------------------------------------------------------------------- responses


@dataclass(frozen=True)
class _Meta:
    id: str
    created: int
    model: str
    prompt_tokens: int

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }

    def body(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }


def _choice(text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}


async def _collect(
    events: asyncio.Queue[Event], job: Job, request: Request, meta: _Meta
) -> dict[str, Any]:
    """Wait for the whole completion; a client that leaves meanwhile cancels its job."""
    parts: list[str] = []
    try:
        while True:
            try:
                event = await asyncio.wait_for(events.get(), POLL_DISCONNECT_S)
            except TimeoutError:
                if await request.is_disconnected():
                    raise ApiError(499, "client disconnected") from None
                continue
            if event.kind == "text":
                parts.append(event.text)
            elif event.kind == "done":
                return meta.body(
                    [_choice("".join(parts), event.finish_reason)],
                    usage=meta.usage(event.completion_tokens),
                )
            else:
                raise ApiError(500, f"generation failed: {event.text}")
    finally:
        job.cancel()


async def _sse(events: asyncio.Queue[Event], meta: _Meta, usage: bool) -> AsyncIterator[str]:
    """OpenAI's stream: chunks of text, a last chunk with finish_reason, then [DONE].

    Text deltas that queued up while the client was reading are sent as one chunk.
    """
    while True:
        event = await events.get()
        text = []
        while event.kind == "text":
            text.append(event.text)
            if events.empty():
                break
            event = events.get_nowait()
        if text:
            yield _data(meta.body([_choice("".join(text), None)]))
        if event.kind == "text":
            continue
        if event.kind == "done":
            yield _data(meta.body([_choice("", event.finish_reason)]))
            if usage:
                yield _data(meta.body([], usage=meta.usage(event.completion_tokens)))
            yield "data: [DONE]\n\n"
            return
        else:
            yield _data(
                {"error": _error_body(f"generation failed: {event.text}", None, "server_error")}
            )
            return


def _data(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class JobStream(StreamingResponse):
    """A streamed response that cancels its job when it ends, however it ends.

    Starlette cancels the body when the client disconnects; the ``finally`` then frees the
    job's batch slot before the next decode step.
    """

    def __init__(self, content: AsyncIterator[str], job: Job, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


def _model_card(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "infinito"}


def _page() -> str:
    return (
        importlib.resources.files("infinito.serve")
        .joinpath("static/playground.html")
        .read_text(encoding="utf-8")
    )


# ---------------------------------------------------------------------- errors and guards


def _error_body(message: str, param: str | None, kind: str) -> dict[str, Any]:
    return {"message": message, "type": kind, "param": param, "code": None}


def _error(status: int, message: str, param: str | None, kind: str, **headers: str) -> Response:
    return JSONResponse({"error": _error_body(message, param, kind)}, status, headers or None)


async def _api_error(_: Request, e: ApiError) -> Response:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if e.status == 503 else {}
    if e.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return _error(e.status, e.message, e.param, e.kind, **headers)


async def _validation_error(_: Request, e: RequestValidationError) -> Response:
    """Pydantic's first complaint as a 400 naming the field (``body`` when the JSON is bad)."""
    first = e.errors()[0]
    if first.get("type") == "json_invalid":
        return _error(
            400,
            f"body is not valid JSON: {first.get('ctx', {}).get('error', '')}",
            None,
            "invalid_request_error",
        )
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":
        message = f"{param}: unknown field; see docs/serve.md for the fields INFINITO accepts"
    else:
        message = f"{param or 'body'}: {first.get('msg', 'invalid')}"
    return _error(400, message, param, "invalid_request_error")


async def _internal_error(_: Request, e: Exception) -> Response:
    log.exception("unhandled error", exc_info=e)
    return _error(500, f"internal error ({type(e).__name__})", None, "server_error")


def _bearer(api_key: str | None) -> Callable[[Request], Awaitable[None]]:
    """A dependency that checks ``Authorization: Bearer <api_key>`` (a no-op without a key)."""

    async def check(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            token.encode(), api_key.encode()
        ):
            raise ApiError(
                401,
                "missing or wrong API key: send Authorization: Bearer <key>",
                kind="authentication_error",
            )

    return check


class BodyLimit:
    """Refuse request bodies over ``MAX_BODY_BYTES`` (413): by Content-Length before reading,
    and by counting while reading a body sent without one."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = _error(
            413, f"request body over {MAX_BODY_BYTES} bytes", None, "invalid_request_error"
        )
        length = dict(scope.get("headers", [])).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            await too_big(scope, receive, send)
            return
        received = 0

        async def counted() -> Any:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > MAX_BODY_BYTES:
                raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes")
            return message

        await self.app(scope, counted, send)
