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
    """The FastAPI app: routes, error handlers and the scheduler's lifespan. What the routes share (the backend,
    the settings, the scheduler and the metrics) lives in `app.state`, where every handler finds it."""
    metrics = ServeMetrics()
    app = FastAPI(title="MetaTuner", lifespan=_lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler = Scheduler(Engine(backend), settings, metrics)
    app.state.metrics, app.state.backend, app.state.settings = metrics, backend, settings
    _add_error_handlers(app, metrics)
    _add_routes(app)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI):
    """The batching thread runs while the server does."""
    app.state.scheduler.start()
    yield
    # uvicorn has already waited for the requests in flight; the thread ends once its batch is empty
    await asyncio.to_thread(app.state.scheduler.stop, app.state.settings.shutdown_grace_s)


def _add_routes(app: FastAPI) -> None:
    authorized = [Depends(_authorize)]  # /health and /metrics stay open: probes and scrapers carry no key
    app.add_api_route("/health", _health, methods=["GET"])
    app.add_api_route("/metrics", _prometheus, methods=["GET"])
    app.add_api_route("/v1/models", _models, methods=["GET"], dependencies=authorized)
    app.add_api_route("/v1/chat/completions", _chat, methods=["POST"], dependencies=authorized)
    app.add_api_route("/v1/completions", _completions, methods=["POST"], dependencies=authorized)


_bearer = HTTPBearer(auto_error=False)


async def _authorize(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    api_key = request.app.state.settings.api_key
    if api_key is None:
        return
    given = credentials.credentials if credentials else ""
    # compare_digest: the time taken does not depend on how much of the key was right
    if not secrets.compare_digest(given.encode(), api_key.encode()):
        raise RequestError("missing or wrong API key (send `Authorization: Bearer <key>`)", status=401,
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


async def _health() -> dict:
    return {"status": "ok"}


async def _prometheus(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def _models(request: Request) -> dict:
    return model_list(request.app.state.backend.name)


async def _chat(request: Request):
    state = request.app.state
    body = _parse(ChatRequest, await _read_body(request, state.settings.max_body_bytes))
    question = body.question()
    if not question.strip():
        raise RequestError("messages: the last user message is empty", "messages")
    if isinstance(state.backend, ModelBackend):  # a plain model reads the whole conversation, as given
        question = state.backend.render_chat([{"role": m.role, "content": m.text()} for m in body.messages])
    return await _answer(request, "chat", body, question, body.requested_tokens())


async def _completions(request: Request):
    body = _parse(CompletionRequest, await _read_body(request, request.app.state.settings.max_body_bytes))
    if not body.text().strip():
        raise RequestError("prompt: empty", "prompt")
    return await _answer(request, "completion", body, body.text(), body.requested_tokens())


async def _answer(request: Request, kind: str, body, text: str, requested: int | None):
    """Both completion routes: check, queue, then stream or collect."""
    answer = _Answer(request, kind, body)
    answer.submit(text, requested)
    if not body.stream:
        return await answer.collect()
    return EventSourceResponse(answer.stream(), headers={"Cache-Control": "no-cache"})


class _Answer:
    """One completion request, from its checks to its answer, streamed or collected: both ways share the checks,
    the deadline, the metrics and the cancellation of a request whose client has gone."""

    def __init__(self, request: Request, kind: str, body):
        self.start = time.monotonic()
        state = request.app.state
        self.request, self.kind, self.body = request, kind, body
        self.backend, self.settings, self.metrics = state.backend, state.settings, state.metrics
        self.scheduler = state.scheduler
        if body.model != self.backend.name:
            raise RequestError(f"model: {body.model!r} is not served here; this server serves {self.backend.name!r}",
                               "model", status=404, code="model_not_found")
        self.endpoint = "chat" if kind == "chat" else "completions"
        self.rid, self.created = new_id("chatcmpl" if kind == "chat" else "cmpl"), int(time.time())
        self.deadline = self.start + self.settings.request_timeout_s
        self.events: asyncio.Queue = asyncio.Queue()
        self.first_text = _once(lambda: self.metrics.first_token.observe(time.monotonic() - self.start))
        self.job: Job | None = None

    def max_tokens(self, requested: int | None) -> int:
        """The request's max_tokens, or the server's default; 400 above the server's cap."""
        cap = self.settings.max_tokens_cap
        if requested is not None and requested > cap:
            raise RequestError(f"max_tokens: {requested} is above this server's limit of {cap}", "max_tokens")
        return requested or min(self.settings.default_max_tokens or self.backend.default_max_tokens, cap)

    def submit(self, text: str, requested: int | None) -> None:
        """Queue the request for the batch (400 first when max_tokens, or the input with it, does not fit)."""
        body, max_tokens = self.body, self.max_tokens(requested)
        self.backend.input_tokens(text, max_tokens, "messages" if self.kind == "chat" else "prompt")
        loop = asyncio.get_running_loop()
        self.job = Job(text=text, max_tokens=max_tokens,
                       emit=lambda e: loop.call_soon_threadsafe(self.events.put_nowait, e),
                       temperature=1.0 if body.temperature is None else body.temperature,
                       top_p=1.0 if body.top_p is None else body.top_p, stop=body.stop_strings(), seed=body.seed)
        self.scheduler.submit(self.job)

    async def next_event(self):
        """The job's next event; 504 (and the job cancelled) once the request's time is up."""
        try:
            return await asyncio.wait_for(self.events.get(), max(self.deadline - time.monotonic(), 0))
        except asyncio.TimeoutError:
            self.job.cancel()
            raise RequestError(f"the request took longer than {self.settings.request_timeout_s:g} s", status=504,
                               type="timeout_error", code="timeout") from None

    def completion(self, text: str | None, finish_reason: str | None, extension: dict | None = None, **kwargs):
        return completion_object(self.kind, self.rid, self.body.model, self.created, text, finish_reason, extension,
                                 **kwargs)

    async def collect(self) -> dict:
        """The whole answer as one completion object."""
        watcher = asyncio.create_task(_cancel_when_gone(self.request, self.job, self.events))
        try:
            started, event = None, None
            while not isinstance(event, (Done, Failed)):
                event = await self.next_event()
                if isinstance(event, Started):
                    started = event
                elif isinstance(event, Delta):
                    self.first_text()
        finally:
            watcher.cancel()
            self.job.cancel()  # no-op once done; otherwise (timeout, client gone) the row leaves the batch
        if isinstance(event, Failed):
            raise event.error
        _count(self.metrics, self.endpoint, started, event, self.start)
        return self.completion(event.text, event.finish_reason, _extension(started),
                               usage_=usage(started.prompt_tokens, event.completion_tokens))

    async def stream(self):
        """The answer as server-sent events: an opening chunk, the text as it comes, the end (and usage), [DONE]."""
        started = None
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        try:
            while True:
                try:
                    event = await self.next_event()
                except RequestError as err:
                    event = Failed(err)
                if isinstance(event, Started):
                    started = event
                    yield _sse(self.opening(event))
                elif isinstance(event, Delta):
                    self.first_text()
                    yield _sse(self.completion(event.text, None, delta=True))
                elif isinstance(event, Done):
                    _count(self.metrics, self.endpoint, started, event, self.start)
                    yield _sse(self.completion(None, event.finish_reason, delta=True))
                    if include_usage:
                        yield _sse(self.completion(None, None, delta=True,
                                                   usage_=usage(started.prompt_tokens, event.completion_tokens)))
                    break
                else:  # headers are sent: the error goes in the stream, where the openai client raises it
                    self.metrics.requests.labels(self.endpoint, str(event.error.status)).inc()
                    yield _sse(event.error.body())
                    break
            yield format_sse_event(data_str="[DONE]")
        finally:
            self.job.cancel()

    def opening(self, started: Started) -> dict:
        """The first chunk: the written prompt (and, for chat, the assistant role)."""
        opening = self.completion("", None, _extension(started), delta=True)
        if self.kind == "chat":
            opening["choices"][0]["delta"]["role"] = "assistant"
        return opening


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
