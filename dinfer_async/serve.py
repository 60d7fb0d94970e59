"""dinfer-serve: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the async Client.

    dinfer-serve --model DIR --workers N [--host 127.0.0.1] [--port 8000] [--api-key KEY]
                 [engine flags] [sampling flags: the defaults of every request]

The server is one more client of the workers: each HTTP request is one `Client.stream`, so
batching, routing and backpressure are the client's (a slow reader's chunks are merged in its
own buffer; nobody waits for it). A client that disconnects has its request aborted on the
worker before the next step: a watcher on the ASGI receive channel cancels the request's
iteration the moment the connection closes. Only this module imports the web stack.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import logging
import os
import socket
import sys
import time
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import msgspec
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from dinfer_async import openai_api as api
from dinfer_async.cli import (
    Parser,
    add_common_flags,
    add_engine_flags,
    add_sampling_flags,
    configure_logging,
    engine_flags_problem,
    expert_parallel,
    flag,
    sampling_defaults,
)
from dinfer_async.client import Client
from dinfer_async.errors import (
    ClientClosedError,
    DinferError,
    InvalidRequestError,
    WorkerDiedError,
    WorkerError,
)
from dinfer_async.metrics import Metrics
from dinfer_async.params import SamplingParams
from dinfer_async.protocol import Chunk

HEALTH_TIMEOUT = 5.0  # seconds a worker has to answer /health's ping

log = logging.getLogger("dinfer_async.serve")


def json_response(body: dict, status: int = 200) -> Response:
    return Response(msgspec.json.encode(body), status_code=status, media_type="application/json")


def error_response(error: api.ApiError) -> Response:
    return json_response(error.body(), error.status)


def api_error(e: Exception) -> api.ApiError:
    """A client-side error in OpenAI's shape, with the status that tells a caller what to do."""
    if isinstance(e, InvalidRequestError):
        return api.invalid(e.field, e.reason)
    if isinstance(e, WorkerDiedError):
        return api.ApiError(503, f"the worker died: {e}; retry", code="worker_died")
    if isinstance(e, ClientClosedError):
        return api.ApiError(503, "the server is shutting down", code="shutting_down")
    if isinstance(e, WorkerError):
        return api.ApiError(500, f"the worker failed: {e}", code="worker_error")
    return api.ApiError(500, f"internal error: {e!r}", code="internal_error")


class BearerAuth:
    """ASGI middleware: with a key set, every request needs `Authorization: Bearer KEY`."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                error = api.ApiError(
                    401,
                    "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                    code="invalid_api_key",
                )
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def watch_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


class Run:
    """One request's iteration over Client.stream, with its metrics and its clean end."""

    def __init__(self, server: Server, client: Client, request: api.ApiRequest, begin: float):
        self.server, self.request, self.begin = server, request, begin
        # a Chunk per step (text_only is off); aclose() leaves it, aborting the request
        self.stream: AsyncGenerator[Any, None] = client.stream(  # type: ignore[assignment]
            **request.inputs, params=request.params
        )
        self.waiting, self.first_text, self.closed = True, False, False
        server.metrics.running.inc()
        server.metrics.waiting.inc()

    async def next(self) -> Chunk | None:
        """The next chunk, None after the last; DinferError when the request failed."""
        metrics = self.server.metrics
        try:
            chunk = await self.stream.__anext__()
        except StopAsyncIteration:
            return None
        except WorkerDiedError:
            metrics.died.inc()
            raise
        if self.waiting:
            self.waiting = False
            metrics.waiting.dec()
        if chunk.stable_text and not self.first_text:
            self.first_text = True
            metrics.ttft.observe(time.perf_counter() - self.begin)
        if chunk.finish_reason is not None:
            metrics.finished(chunk.stats)
            metrics.latency.observe(time.perf_counter() - self.begin)
        return chunk

    async def collect(self) -> tuple[str, Chunk]:
        pieces, last = [], None
        while (chunk := await self.next()) is not None:
            pieces.append(chunk.stable_text)
            last = chunk
        if last is None or last.finish_reason is None:
            raise WorkerError("the request ended without a final chunk")
        return "".join(pieces), last

    async def close(self) -> None:
        """Leave the client's iteration (which aborts the request if it is still running)."""
        if self.closed:
            return
        self.closed = True
        with anyio.CancelScope(shield=True):
            await self.stream.aclose()
        self.server.metrics.running.dec()
        if self.waiting:
            self.server.metrics.waiting.dec()


class Answer(Response):
    """The answer to one generation request, whole (JSON) or streamed (server-sent events).
    Watches the receive channel while it runs, so that a client that disconnects has its
    request cancelled at once (which aborts it on the worker), not when a send fails."""

    done = False  # a complete answer (or an error) was sent

    def __init__(self, run: Run, endpoint: str):
        self.run, self.endpoint = run, endpoint
        self.status_code, self.background = 200, None
        self.init_headers({})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = self.run.server
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch_disconnect, receive, tg.cancel_scope)
                # OSError: the connection is gone (ASGI 2.4 servers raise on send)
                with contextlib.suppress(OSError):
                    await (self.stream(send) if self.run.request.stream else self.whole(send))
                tg.cancel_scope.cancel()
        finally:
            if not self.done:  # the HTTP client left first: its request was aborted
                server.metrics.aborted.inc()
                server.count(self.endpoint, 499)
            await self.run.close()

    async def reply(self, send: Send, status: int, body: dict) -> None:
        self.run.server.count(self.endpoint, status)
        await json_response(body, status)({"type": "http"}, _no_receive, send)
        self.done = True

    async def whole(self, send: Send) -> None:
        try:
            text, last = await self.run.collect()
        except DinferError as e:
            error = api_error(e)
            await self.reply(send, error.status, error.body())
            return
        request = self.run.request
        await self.reply(send, 200, api.response(request, api.new_id(request.kind), text, last))

    async def stream(self, send: Send) -> None:
        try:  # errors before the first chunk (e.g. the worker refuses the prompt) are statuses
            chunk = await self.run.next()
        except DinferError as e:
            error = api_error(e)
            await self.reply(send, error.status, error.body())
            return
        self.run.server.count(self.endpoint, 200)
        shape = api.StreamShape(self.run.request, api.new_id(self.run.request.kind))
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        head = shape.start() or b""
        try:
            while chunk is not None:
                data = shape.chunk(chunk)
                if head or data:
                    await send(_body(head + (data or b"")))
                    head = b""
                if chunk.finish_reason is not None:
                    break
                chunk = await self.run.next()
        except DinferError as e:
            await send(_body(api.error_event(api_error(e))))
        self.done = True
        await send(_body(b"", more=False))


async def _no_receive() -> dict:
    return {"type": "http.disconnect"}


def _body(data: bytes, more: bool = True) -> dict:
    return {"type": "http.response.body", "body": data, "more_body": more}


class Server:
    """The app's state: the client, the request defaults, the served model name, metrics."""

    def __init__(
        self,
        client_kwargs: dict,
        defaults: dict,
        model_name: str | None,
        client: Client | None = None,
    ):
        self.client_kwargs, self.defaults, self.model_name = client_kwargs, defaults, model_name
        self.opened = client  # a client its owner opened (and closes): dinfer-serve's main
        self.client: Client | None = None
        self.metrics = Metrics()
        self.created = int(time.time())

    @asynccontextmanager
    async def lifespan(self, app: FastAPI):
        owned = contextlib.nullcontext(self.opened) if self.opened else Client(**self.client_kwargs)
        async with owned as client:
            self.client = client
            welcome = client.welcome  # every worker answered the handshake by now
            self.model_name = self.model_name or (welcome.model if welcome else "dinfer")
            self.metrics.watch_client(client)
            yield
            self.client = None

    def count(self, endpoint: str, status: int) -> None:
        self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()

    async def body(self, request: Request) -> object:
        raw = await request.body()
        try:
            return msgspec.json.decode(raw)
        except msgspec.DecodeError as e:
            raise api.ApiError(
                400, f"could not parse the JSON body: {e}", code="invalid_json"
            ) from None

    async def generate(self, request: Request, parse, endpoint: str) -> Response:
        begin = time.perf_counter()
        try:
            if self.client is None:
                raise api.ApiError(503, "the server is not ready", code="not_ready")
            limit = self.max_gen_length()
            req = parse(await self.body(request), self.defaults, self.model_name, limit)
        except api.ApiError as e:
            self.count(endpoint, e.status)
            return error_response(e)
        return Answer(Run(self, self.client, req, begin), endpoint)

    def max_gen_length(self) -> int | None:
        welcome = self.client.welcome if self.client is not None else None
        return welcome.max_gen_length if welcome is not None else None

    async def loads(self) -> list[int]:
        if self.client is None:
            raise ClientClosedError("the server is not ready")
        with anyio.fail_after(HEALTH_TIMEOUT):
            return await self.client.worker_load()


def create_app(
    client_kwargs: dict | None = None,
    defaults: dict | None = None,
    api_key: str | None = None,
    model_name: str | None = None,
    client: Client | None = None,
) -> FastAPI:
    """The ASGI app. client_kwargs go to Client(...) at start-up, unless `client` (already open,
    closed by its owner) is given; defaults are SamplingParams fields every request starts from;
    model_name is what /v1/models lists (default: the workers' model)."""
    server = Server(client_kwargs or {}, defaults or {}, model_name, client)
    app = FastAPI(title="dinfer-serve", lifespan=server.lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    if api_key:
        app.add_middleware(BearerAuth, key=api_key)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(api.ApiError(exc.status_code, f"{exc.detail}", code=code))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = (exc.errors() or [{}])[0]
        param = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query"))
        message = f"{param}: {first.get('msg', 'invalid')}" if param else str(first.get("msg"))
        return error_response(api.ApiError(422, message, param=param or None, code="invalid_value"))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await server.generate(request, api.parse_chat, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await server.generate(request, api.parse_completion, "completions")

    def model_card() -> dict:
        limit = server.max_gen_length()
        return {
            "id": server.model_name,
            "object": "model",
            "created": server.created,
            "owned_by": "dinfer",
            "max_gen_length": limit,
        }

    @app.get("/v1/models")
    async def models() -> Response:
        return json_response({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> Response:
        if model_id != server.model_name:
            error = api.ApiError(
                404, f"model: {model_id!r} is not served here", "model", "model_not_found"
            )
            return error_response(error)
        return json_response(model_card())

    @app.get("/health")
    async def health() -> Response:
        """200 with each worker's active requests; 503 if a worker does not answer."""
        try:
            loads = await server.loads()
        except (DinferError, TimeoutError, OSError) as e:
            return error_response(
                api.ApiError(503, f"workers not answering: {e!r}", code="unavailable")
            )
        return json_response({"status": "ok", "model": server.model_name, "workers": loads})

    @app.get("/metrics")
    async def metrics() -> Response:
        try:
            loads = await server.loads()
        except (DinferError, TimeoutError, OSError):
            loads = None
        return Response(server.metrics.render(loads), media_type=CONTENT_TYPE_LATEST)

    return app


def parser() -> argparse.ArgumentParser:
    ap = Parser(
        prog="dinfer-serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_flags(ap, "dinfer-serve")
    add_engine_flags(ap)
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every request (default: $DINFER_API_KEY)",
    )
    ap.add_argument("--served-model-name", default=None, help="the model id clients send")
    ap.add_argument("--max-batch-size", type=int, default=32, help="requests per worker batch")
    ap.add_argument("--stream-buffer", type=int, default=64, help="chunks buffered per stream")
    ap.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    ap.add_argument("--access-log", action="store_true", help="log every HTTP request")
    add_sampling_flags(ap)
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = parser()
    args = ap.parse_args(argv)
    defaults = sampling_defaults(args)
    try:
        SamplingParams(**defaults).validate()
    except InvalidRequestError as e:
        ap.error(f"{flag(e.field)}: {e.reason}")
    problem = engine_flags_problem(args)
    if problem:
        ap.error(problem)
    configure_logging("dinfer-serve", args.debug)
    try:  # a port in use is one line now, not a traceback after the workers have loaded
        with socket.create_server((args.host, args.port)):
            pass
    except OSError as e:
        log.error(
            "cannot listen on %s:%s (%s): pick another --port or stop what is using it",
            args.host,
            args.port,
            os.strerror(e.errno) if e.errno else e,
        )
        sys.exit(2)
    api_key = args.api_key or os.environ.get("DINFER_API_KEY") or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("serving on %s without an API key", args.host)
    client_kwargs = {
        "model": args.model,
        "workers": args.workers,
        "device": args.device,
        "dtype": args.dtype,
        "threads": args.threads,
        "max_batch_size": args.max_batch_size,
        "stream_buffer": args.stream_buffer,
        "tensor_parallel_size": args.tensor_parallel_size,
        "expert_parallel": expert_parallel(args),
        "gpus": args.gpus,
    }
    config = dict(
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=args.access_log,
        timeout_graceful_shutdown=5,
    )
    try:
        import uvloop

        sys.exit(uvloop.run(_serve(client_kwargs, defaults, api_key, args, config)))
    except ImportError:
        sys.exit(asyncio.run(_serve(client_kwargs, defaults, api_key, args, config)))


async def _serve(
    client_kwargs: dict, defaults: dict, api_key: str | None, args: argparse.Namespace, config: dict
) -> int:
    """Start the workers first, so a failure (bad model, no CUDA, ...) is one line and exit 2,
    then serve HTTP until a signal; the workers stop with the server."""
    try:
        client = await Client(**client_kwargs).__aenter__()
    except InvalidRequestError as e:  # too few GPUs for the workers, ...
        log.error("%s: %s", flag(e.field), e.reason)
        return 2
    except DinferError as e:
        log.error("could not start the workers: %s", e, exc_info=True)
        return 2
    try:
        app = create_app(client_kwargs, defaults, api_key, args.served_model_name, client)
        await uvicorn.Server(uvicorn.Config(app, **config)).serve()
    finally:
        await client.close()
    return 0


if __name__ == "__main__":
    main()
