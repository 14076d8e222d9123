"""The HTTP server of `facellava serve`: OpenAI's chat completions (streaming by server-sent events or not),
`/v1/models`, `/health` and Prometheus `/metrics`, over one opened Pipeline.

One model answers one request at a time on one worker thread; requests wait in a bounded queue (HTTP 429 when it
is full), each has a deadline, and a client that disconnects stops its generation at the next token. Every
refusal is one JSON error in OpenAI's shape; nothing a client sends produces a traceback.

```python
app = create_app(Pipeline.open("bundle"), ServeConfig(model_name="tiny", api_key="secret"))
uvicorn.run(app, host="127.0.0.1", port=8080)
```
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from facellava.errors import FaceLlavaError
from facellava.runtime.pipeline import Answer, Pipeline
from facellava.runtime.serve import media
from facellava.runtime.serve.api import ApiError, ChatRequest, parse_chat_request, parse_json_body
from facellava.runtime.serve.metrics import Metrics

log = logging.getLogger("facellava.serve")

STATIC_DIR = Path(__file__).resolve().parent / "static"
PROTECTED = ("/v1/", "/metrics")  # behind the API key when one is set; /health and the static page are not


@dataclass(frozen=True)
class ServeConfig:
    """The server's settings: the model's name, the API key, the limits and what media a request may name."""

    model_name: str = "facellava"
    api_key: str | None = None
    max_body_bytes: int = 32 * 1024 * 1024
    max_queue: int = 8  # requests waiting behind the one being answered
    request_timeout_s: float = 300.0
    default_max_tokens: int = 256
    max_tokens_limit: int = 2048
    media: media.MediaPolicy = field(default_factory=media.MediaPolicy)
    cors_origins: tuple[str, ...] = ()
    static_dir: Path | None = STATIC_DIR  # served at / when it holds an index.html


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


class _Cancelled(Exception):
    """The client went away: the generation stopped."""


@dataclass
class Job:
    chat: ChatRequest
    path: Path
    workdir: Path
    deadline: float
    cancel: threading.Event = field(default_factory=threading.Event)


class Engine:
    """One Pipeline, one worker thread, and the count of requests admitted (answered or waiting)."""

    def __init__(self, pipeline: Pipeline, config: ServeConfig, metrics: Metrics):
        self.pipeline = pipeline
        self.config = config
        self.metrics = metrics
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="facellava-model")
        self._lock = threading.Lock()
        self.waiting = 0
        self.running = 0

    def admit(self) -> None:
        """Take a place in the queue. Raises ApiError (429) when it is full."""
        with self._lock:
            if self.waiting + self.running > self.config.max_queue:
                raise ApiError(429, f"the server is busy: {self.config.max_queue} requests are already waiting; "
                                    "retry later", "rate_limit_error", code="queue_full")
            self.waiting += 1

    def release(self) -> None:
        """Give back a place taken by `admit` for a request that never reached the model."""
        with self._lock:
            self.waiting -= 1

    def run(self, job: Job, emit: Callable[[str], None] | None) -> Answer:
        """Answer one job on the worker thread, passing each text piece to `emit`. Raises ApiError (504) past the
        deadline, _Cancelled when the client left, FaceLlavaError for input the runtime refuses."""
        with self._lock:
            self.waiting -= 1
            self.running += 1
        pieces = None
        try:
            if job.cancel.is_set():
                raise _Cancelled
            self._check_deadline(job)
            chat = job.chat
            source = {"image": job.path} if chat.media.modality == "image" else {"video": job.path}
            stream = self.pipeline.ask(chat.question, **source, max_tokens=chat.max_tokens,
                                       temperature=chat.sampling.temperature, top_p=chat.sampling.top_p,
                                       top_k=chat.sampling.top_k, seed=chat.sampling.seed, stream=True,
                                       grammar=chat.sampling.grammar)
            pieces = iter(stream)
            for piece in pieces:
                if emit is not None:
                    emit(piece)
                if job.cancel.is_set():
                    raise _Cancelled
                self._check_deadline(job)
            assert stream.answer is not None
            self.metrics.observe_answer(stream.answer)
            return stream.answer
        finally:
            if pieces is not None:
                pieces.close()  # stops llama.cpp's generation and frees its sampler
            shutil.rmtree(job.workdir, ignore_errors=True)
            with self._lock:
                self.running -= 1

    def _check_deadline(self, job: Job) -> None:
        if time.monotonic() > job.deadline:
            raise ApiError(504, f"the request took longer than {self.config.request_timeout_s:g} s", "timeout_error",
                           code="timeout")

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


def _check_key(header: str, key: str) -> bool:
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("utf-8", "replace"),
                                                              key.encode("utf-8"))


class Guard:
    """ASGI middleware: the API key on the protected paths (constant-time compare) and the request counter."""

    def __init__(self, app: Any, config: ServeConfig, metrics: Metrics):
        self.app = app
        self.config = config
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def record(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        path = scope.get("path", "")
        try:
            if self.config.api_key and path.startswith(PROTECTED):
                headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
                if not _check_key(headers.get("authorization", ""), self.config.api_key):
                    error = ApiError(401, "a valid API key is needed: send the header 'Authorization: Bearer KEY'",
                                     "authentication_error", code="invalid_api_key")
                    await error_response(error)(scope, receive, record)
                    return
            await self.app(scope, receive, record)
        finally:
            self.metrics.count_request(path, status)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, read up to `limit` bytes. Raises ApiError (413) beyond it."""
    declared = request.headers.get("content-length", "")
    too_large = ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _finish_reason(answer: Answer) -> str:
    return "length" if answer.finish_reason == "length" else "stop"


def _usage(answer: Answer) -> dict[str, int]:
    return {"prompt_tokens": answer.prompt_positions, "completion_tokens": len(answer.tokens),
            "total_tokens": answer.prompt_positions + len(answer.tokens)}


def _details(answer: Answer) -> dict[str, Any]:
    """What the OpenAI shape has no field for: where the landmarks came from, the KV-cache reuse, the timings."""
    return {"modality": answer.modality, "landmarks": answer.landmarks, "finish_reason": answer.finish_reason,
            "prompt_positions": answer.prompt_positions,
            "reused_prefix_positions": answer.reused_prefix_positions, "timings": asdict(answer.timings)}


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def create_app(pipeline: Pipeline, config: ServeConfig) -> FastAPI:
    """The FastAPI application answering with `pipeline` under `config`. The caller owns the pipeline; the app's
    worker thread stops at shutdown."""
    metrics = Metrics()
    engine = Engine(pipeline, config, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.close()  # lets the answer in progress finish; drops the waiting ones

    app = FastAPI(title="facellava", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.engine = engine
    app.add_middleware(Guard, config=config, metrics=metrics)
    if config.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        # added last, so outermost: a preflight is answered before the key is asked for
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, error: ApiError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return error_response(ApiError(error.status_code, str(error.detail), kind))

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, error: Exception) -> JSONResponse:
        log.exception("internal error", exc_info=error)
        return error_response(ApiError(500, "internal server error (see the server's log)", "server_error"))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": config.model_name}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "facellava"}]}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(waiting=engine.waiting, running=engine.running),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = parse_json_body(await read_body(request, config.max_body_bytes))
        chat = parse_chat_request(body, config.default_max_tokens, config.max_tokens_limit)
        engine.admit()
        workdir = Path(tempfile.mkdtemp(prefix="facellava-serve-"))
        try:
            path = await run_in_threadpool(media.fetch, chat.media, config.media, workdir)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            engine.release()
            raise
        job = Job(chat, path, workdir, time.monotonic() + config.request_timeout_s)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        loop = asyncio.get_running_loop()
        if not chat.stream:
            future = loop.run_in_executor(engine.executor, engine.run, job, None)
            answer = await _wait(future, request, job)
            return {"id": completion_id, "object": "chat.completion", "created": created,
                    "model": config.model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                                 "finish_reason": _finish_reason(answer)}],
                    "usage": _usage(answer), "facellava": _details(answer)}

        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        future = loop.run_in_executor(engine.executor, engine.run, job,
                                      lambda piece: loop.call_soon_threadsafe(queue.put_nowait, ("piece", piece)))
        future.add_done_callback(lambda done: queue.put_nowait(("done", done)))
        future.add_done_callback(_retrieve)  # a client that left never reads the job's outcome
        first = await _first_event(queue, request, job)
        if first[0] == "done":
            first[1].result()  # an error before any text is an ordinary JSON error with its status

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                    "model": config.model_name, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        async def events() -> AsyncIterator[str]:
            try:
                yield _sse(chunk({"role": "assistant", "content": ""}))
                item = first
                while item[0] == "piece":
                    yield _sse(chunk({"content": item[1]}))
                    item = await queue.get()
                try:
                    answer = item[1].result()
                except (ApiError, FaceLlavaError, _Cancelled) as error:
                    failure = error if isinstance(error, ApiError) else ApiError(400, str(error))
                    yield _sse(failure.body())
                else:
                    final = chunk({}, _finish_reason(answer))
                    final["facellava"] = _details(answer)
                    yield _sse(final)
                    if chat.include_usage:
                        yield _sse({**chunk({}), "choices": [], "usage": _usage(answer)})
                yield _sse("[DONE]")
            finally:
                job.cancel.set()  # a client that left stops the generation at its next token

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    if config.static_dir is not None and (config.static_dir / "index.html").is_file():
        from starlette.staticfiles import StaticFiles

        app.mount("/", StaticFiles(directory=config.static_dir, html=True), name="static")
    return app


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


async def _wait(future: asyncio.Future, request: Request, job: Job) -> Answer:
    """The job's answer; a client that disconnects meanwhile cancels it. Raises what the job raised, as ApiError."""
    while True:
        done, _ = await asyncio.wait({future}, timeout=0.25)
        if done:
            break
        if await request.is_disconnected():
            job.cancel.set()
    try:
        return future.result()
    except FaceLlavaError as error:
        raise ApiError(400, str(error)) from None
    except _Cancelled:
        raise ApiError(499, "the client closed the request", code="client_closed") from None


async def _first_event(queue: asyncio.Queue, request: Request, job: Job) -> tuple[str, Any]:
    """The first piece of text, or the job's end when it produced none; a client that leaves meanwhile cancels."""
    while True:
        try:
            item = await asyncio.wait_for(queue.get(), timeout=0.25)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel.set()
            continue
        if item[0] == "done" and item[1].exception() is not None:
            error = item[1].exception()
            if isinstance(error, FaceLlavaError):
                raise ApiError(400, str(error))
            if isinstance(error, _Cancelled):
                raise ApiError(499, "the client closed the request", code="client_closed")
        return item
