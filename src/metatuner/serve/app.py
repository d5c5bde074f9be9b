"""The HTTP side: an OpenAI-compatible FastAPI app over a backend, and the uvicorn server that runs it.

    app = create_app(MetaTunerBackend(mt, "metatuner_j"), ServeSettings(max_batch=16))
    run_server(app, settings)          # blocks; SIGTERM or Ctrl-C: stop accepting, finish what is in flight, exit

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, GET /metrics. Every error
is an OpenAI error body (`{"error": {"message", "type", "param", "code"}}`), never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.sse import EventSourceResponse, format_sse_event
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Backend, Delta, Done, Engine, Failed, Job, ModelBackend, Started
from .metrics import ServeMetrics
from .protocol import (ChatRequest, CompletionRequest, RequestError, completion_object, error_body, model_list,
                       new_id, usage, validation_message)
from .scheduler import Scheduler
from .settings import ServeSettings

log = logging.getLogger("metatuner.serve")


def create_app(backend: Backend, settings: ServeSettings) -> FastAPI:
    """The FastAPI app: routes, error handlers and the scheduler's lifespan.

    Longer than a screen on purpose: FastAPI routes are closures over the app's scheduler, metrics and settings,
    and keeping them in this one function keeps every route beside the others it shares them with (moving them
    out would need a module-level app or a dependency for each of the three).
    """
    metrics = ServeMetrics()
    scheduler = Scheduler(Engine(backend), settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        yield
        # uvicorn has already waited for the requests in flight; the thread ends once its batch is empty
        await asyncio.to_thread(scheduler.stop, settings.shutdown_grace_s)

    app = FastAPI(title="MetaTuner", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.metrics, app.state.backend = scheduler, metrics, backend
    _add_error_handlers(app, metrics)
    bearer = HTTPBearer(auto_error=False)

    async def authorize(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if settings.api_key is None:
            return
        given = credentials.credentials if credentials else ""
        # compare_digest: the time taken does not depend on how much of the key was right
        if not secrets.compare_digest(given.encode(), settings.api_key.encode()):
            raise RequestError("missing or wrong API key (send `Authorization: Bearer <key>`)", status=401,
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict:
        return model_list(backend.name)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat(request: Request):
        body = _parse(ChatRequest, await _read_body(request, settings.max_body_bytes))
        question = body.question()
        if not question.strip():
            raise RequestError("messages: the last user message is empty", "messages")
        if isinstance(backend, ModelBackend):  # a plain model reads the whole conversation, as given
            question = backend.render_chat([{"role": m.role, "content": m.text()} for m in body.messages])
        return await _answer(request, "chat", body, question, body.requested_tokens())

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(request: Request):
        body = _parse(CompletionRequest, await _read_body(request, settings.max_body_bytes))
        if not body.text().strip():
            raise RequestError("prompt: empty", "prompt")
        return await _answer(request, "completion", body, body.text(), body.requested_tokens())

    async def _answer(request: Request, kind: str, body, text: str, requested: int | None):
        """Both completion routes: check, queue, then stream or collect. One function (about 85 lines) because
        the streamed and the collected answer share every check and the cancellation of a disconnected client."""
        start = time.monotonic()
        if body.model != backend.name:
            raise RequestError(f"model: {body.model!r} is not served here; this server serves {backend.name!r}",
                               "model", status=404, code="model_not_found")
        if requested is not None and requested > settings.max_tokens_cap:
            raise RequestError(f"max_tokens: {requested} is above this server's limit of {settings.max_tokens_cap}",
                               "max_tokens")
        max_tokens = requested or min(settings.default_max_tokens or backend.default_max_tokens,
                                      settings.max_tokens_cap)
        # 400 when the input and max_tokens do not fit the context
        backend.input_tokens(text, max_tokens, "messages" if kind == "chat" else "prompt")
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        job = Job(text=text, max_tokens=max_tokens, emit=lambda e: loop.call_soon_threadsafe(events.put_nowait, e),
                  temperature=1.0 if body.temperature is None else body.temperature,
                  top_p=1.0 if body.top_p is None else body.top_p, stop=body.stop_strings(), seed=body.seed)
        scheduler.submit(job)
        endpoint = "chat" if kind == "chat" else "completions"
        rid, created = new_id("chatcmpl" if kind == "chat" else "cmpl"), int(time.time())
        deadline = start + settings.request_timeout_s

        async def next_event():
            try:
                return await asyncio.wait_for(events.get(), max(deadline - time.monotonic(), 0))
            except asyncio.TimeoutError:
                job.cancel()
                raise RequestError(f"the request took longer than {settings.request_timeout_s:g} s", status=504,
                                   type="timeout_error", code="timeout") from None

        first_text = _once(lambda: metrics.first_token.observe(time.monotonic() - start))
        if not body.stream:
            watcher = asyncio.create_task(_cancel_when_gone(request, job, events))
            try:
                started, event = None, None
                while not isinstance(event, (Done, Failed)):
                    event = await next_event()
                    if isinstance(event, Started):
                        started = event
                    elif isinstance(event, Delta):
                        first_text()
            finally:
                watcher.cancel()
                job.cancel()  # no-op once done; otherwise (timeout, client gone) the row leaves the batch
            if isinstance(event, Failed):
                raise event.error
            _count(metrics, endpoint, started, event, start)
            return completion_object(kind, rid, body.model, created, event.text, event.finish_reason,
                                     _extension(started), usage(started.prompt_tokens, event.completion_tokens))

        async def stream():
            started = None
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            try:
                while True:
                    try:
                        event = await next_event()
                    except RequestError as err:
                        event = Failed(err)
                    if isinstance(event, Started):
                        started = event
                        # the first chunk carries the written prompt (and, for chat, the assistant role)
                        opening = completion_object(kind, rid, body.model, created, "", None, _extension(event),
                                                    delta=True)
                        if kind == "chat":
                            opening["choices"][0]["delta"]["role"] = "assistant"
                        yield _sse(opening)
                    elif isinstance(event, Delta):
                        first_text()
                        yield _sse(completion_object(kind, rid, body.model, created, event.text, None, delta=True))
                    elif isinstance(event, Done):
                        _count(metrics, endpoint, started, event, start)
                        yield _sse(completion_object(kind, rid, body.model, created, None, event.finish_reason,
                                                     delta=True))
                        if include_usage:
                            yield _sse(completion_object(kind, rid, body.model, created, None, None, delta=True,
                                                         usage_=usage(started.prompt_tokens, event.completion_tokens)))
                        break
                    else:  # headers are sent: the error goes in the stream, where the openai client raises it
                        metrics.requests.labels(endpoint, str(event.error.status)).inc()
                        yield _sse(event.error.body())
                        break
                yield format_sse_event(data_str="[DONE]")
            finally:
                job.cancel()

        return EventSourceResponse(stream(), headers={"Cache-Control": "no-cache"})

    return app


async def _cancel_when_gone(request: Request, job: Job, events: asyncio.Queue) -> None:
    """Wait for the client of a non-streamed request to close its connection, then cancel the request: its row
    leaves the batch at the next step instead of decoding to max_tokens for nobody, and the handler stops waiting.

    The body is read by then, so the next ASGI message is the disconnect. (Starlette watches the connection of a
    streamed response itself and ends the stream, whose `finally` cancels the job.)"""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()
    events.put_nowait(Failed(RequestError("the client closed the connection", status=499, code="client_closed")))


def _once(fn):
    done = []

    def call() -> None:
        if not done:
            done.append(True)
            fn()

    return call


def _sse(obj: dict) -> bytes:
    return format_sse_event(data_str=json.dumps(obj, ensure_ascii=False))


def _extension(started: Started) -> dict[str, Any]:
    return {"prompt": started.prompt}


def _count(metrics: ServeMetrics, endpoint: str, started: Started, done: Done, start: float) -> None:
    metrics.requests.labels(endpoint, "200").inc()
    metrics.prompt_tokens.inc(started.prompt_tokens)
    metrics.generation_tokens.inc(done.completion_tokens)
    metrics.latency.labels(endpoint).observe(time.monotonic() - start)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` bytes (declared or received).

    Starlette's own body limit answers in plain text; clients of this API expect an OpenAI error body."""
    declared = request.headers.get("content-length", "")
    too_large = RequestError(f"the request body is larger than this server's limit of {limit} bytes", status=413,
                             code="request_too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def _parse(model, raw: bytes):
    try:
        return model.model_validate_json(raw)
    except ValidationError as err:
        message, param = validation_message(err.errors(include_url=False))
        raise RequestError(message, param) from None


def _add_error_handlers(app: FastAPI, metrics: ServeMetrics) -> None:
    def respond(request: Request, status: int, body: dict, headers: dict | None = None) -> JSONResponse:
        metrics.requests.labels(_endpoint(request), str(status)).inc()
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, err: RequestError):
        return respond(request, err.status, err.body(), err.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        message, param = validation_message(list(err.errors()))
        return respond(request, 400, error_body(message, "invalid_request_error", param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        # 404 and 405 from routing: the same body shape as every other error
        message = f"no route {request.url.path}" if err.status_code == 404 else str(err.detail)
        return respond(request, err.status_code, error_body(message, "invalid_request_error"), err.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception):
        log.exception("unexpected error answering %s", request.url.path)
        return respond(request, 500, error_body("internal server error", "server_error"))


def _endpoint(request: Request) -> str:
    path = request.url.path
    return {"/v1/chat/completions": "chat", "/v1/completions": "completions"}.get(path, "other")


def make_server(app: FastAPI, settings: ServeSettings):
    """The uvicorn server for `app`: SIGTERM or Ctrl-C stops accepting, lets the requests in flight finish (up to
    `shutdown_grace_s`), then the lifespan stops the batching thread."""
    import uvicorn

    # http="h11": the header-size limit below is h11's (uvicorn's httptools parser has its own, fixed one)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=int(settings.shutdown_grace_s),
                            h11_max_incomplete_event_size=settings.max_header_bytes, http="h11")
    return uvicorn.Server(config)


def run_server(app: FastAPI, settings: ServeSettings) -> None:
    """Serve until SIGTERM or Ctrl-C (blocks)."""
    make_server(app, settings).run()
