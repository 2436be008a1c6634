"""What every generating endpoint shares: request ids, admission control, request logging, engine streams
that are validated before the response starts and abort when dropped, disconnect watching, SSE framing.

Must not format endpoint-specific responses (serving_chat / serving_completion do).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from kiln.config import ServerConfig
from kiln.engine.input_processor import PromptType
from kiln.entrypoints.openai.errors import error_body, status_of
from kiln.entrypoints.openai.generation_defaults import load_generation_defaults
from kiln.entrypoints.openai.serving_models import ServingModels
from kiln.errors import EngineDeadError, InvalidRequestError, TooManyRequestsError
from kiln.logger import init_logger
from kiln.outputs import RequestOutput
from kiln.sampling.params import SamplingParams

if TYPE_CHECKING:
    from kiln.engine.async_llm import AsyncLLM, RequestOutputStream

logger = init_logger(__name__)

SSE_DONE = "data: [DONE]\n\n"
_MIN_LOGPROB = -9999.0  # JSON has no -inf: clamp as vLLM does


def sse(payload: str) -> str:
    return f"data: {payload}\n\n"


class ChunkFramer:
    """The SSE events of one streamed response. The fields every chunk repeats (id, object,
    created, model) are encoded once: JSON-encoding whole chunks was ~8 us of the event loop's
    ~70 us per streamed token, the choices alone ~4."""

    def __init__(self, request_id: str, object_name: str, created: int, model: str) -> None:
        head = json.dumps({"id": request_id, "object": object_name, "created": created, "model": model,
                           "system_fingerprint": None})
        self._head = f"data: {head[:-1]}, \"choices\": "

    def frame(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None,
              with_usage: bool = False) -> str:
        """One event: the head, `choices`, and a "usage" field when `with_usage` (null if None)."""
        tail = f", \"usage\": {json.dumps(usage)}}}\n\n" if with_usage else "}\n\n"
        return f"{self._head}{json.dumps(choices)}{tail}"


def clamp_logprob(value: float) -> float:
    return max(value, _MIN_LOGPROB)


def prompt_logprobs_json(output: RequestOutput) -> list[dict[str, dict[str, Any]] | None] | None:
    """RequestOutput.prompt_logprobs as vLLM serializes them (token ids become JSON keys)."""
    if output.prompt_logprobs is None:
        return None
    return [None if entry is None else {
        str(token_id): {"logprob": clamp_logprob(lp.logprob), "rank": lp.rank, "decoded_token": lp.decoded_token}
        for token_id, lp in entry.items()} for entry in output.prompt_logprobs]


def random_id() -> str:
    return uuid.uuid4().hex


@dataclass(slots=True)
class EngineRequest:
    """One engine request of an HTTP request (a completions request with k prompts makes k)."""

    request_id: str
    prompt: PromptType
    params: SamplingParams
    priority: int = 0


class EngineStreams:
    """The engine requests of one HTTP request, merged into one stream of (prompt_index, RequestOutput).

    `open()` adds every request to the engine at once, so validation errors raise there, before
    any response byte is sent. Iteration yields each request's latest output as it arrives (a
    reader that lags gets fewer, larger steps: the outputs are cumulative). `close()` aborts the
    requests still running, whose KV blocks then return to the pool.
    """

    def __init__(self, serving: OpenAIServing, requests: list[EngineRequest]) -> None:
        self.serving = serving
        self.requests = requests
        self.streams: list[RequestOutputStream] = []
        self.wake = asyncio.Event()
        self.waiting: set[int] = set()  # indices admitted that have no output yet (admission control counts them)
        self.released: set[int] = set()

    async def open(self) -> None:
        self.serving.admit(self.requests)
        self.waiting = set(range(len(self.requests)))
        try:
            for request in self.requests:
                self.streams.append(self.serving.engine.add_request(
                    request.prompt, request.params, request.request_id, request.priority, wake=self.wake))
        except BaseException:
            self.close()
            raise

    def _release_queued(self, index: int) -> None:
        if index in self.waiting:
            self.waiting.discard(index)
            self.serving.num_queued -= 1

    def _release(self, index: int) -> None:
        self._release_queued(index)
        if index not in self.released:
            self.released.add(index)
            self.serving.active_ids.discard(self.requests[index].request_id)

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        while len(self.released) < len(self.requests):
            self.wake.clear()
            for index, stream in enumerate(self.streams):
                if not stream.ready:
                    continue
                try:
                    output = stream.take()
                finally:
                    self._release_queued(index)
                    if stream.finished:
                        self._release(index)
                if output is not None:
                    yield index, output
            if len(self.released) < len(self.requests) and not any(stream.ready for stream in self.streams):
                await self.wake.wait()

    def close(self) -> None:
        """Abort every engine request still running (a disconnect, an error, or the end of a response)."""
        for index, request in enumerate(self.requests):
            stream = self.streams[index] if index < len(self.streams) else None
            if stream is not None and not stream.finished and index not in self.released:
                logger.info("Aborting request %s before it finished", request.request_id)
                self.serving.engine.abort(request.request_id)
            self._release(index)


async def _wait_for_disconnect(raw_request: Request) -> None:
    while True:
        message = await raw_request.receive()
        if message["type"] == "http.disconnect":
            return


async def collect_final(streams: EngineStreams, raw_request: Request) -> dict[int, RequestOutput]:
    """The last output of every engine request; a client disconnect aborts them all at once."""

    async def gather() -> dict[int, RequestOutput]:
        finals: dict[int, RequestOutput] = {}
        async for index, output in streams:
            finals[index] = output
        return finals

    gatherer = asyncio.create_task(gather())
    watcher = asyncio.create_task(_wait_for_disconnect(raw_request))
    try:
        await asyncio.wait({gatherer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not gatherer.done():
            logger.info("Client of request %s disconnected", streams.requests[0].request_id)
            raise ClientGone()
        return gatherer.result()
    finally:
        for task in (gatherer, watcher):
            task.cancel()
        streams.close()


class ClientGone(Exception):
    """The client went away before its answer was ready; nobody reads the response."""


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that always closes its body iterator, so the engine request is aborted
    at once when the client disconnects (Starlette cancels the send loop, leaving the generator
    suspended otherwise)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


def stream_error_event(exc: BaseException, request_id: str) -> str:
    status, message, param, _ = status_of(exc)
    if status >= 500 and not isinstance(exc, EngineDeadError):
        logger.error("Request %s failed while streaming", request_id, exc_info=exc)
        message = f"Internal server error (request id {request_id})"
    return sse(json.dumps(error_body(status, message, param)))


class OpenAIServing:
    """State shared by the generating endpoints: engine, names, defaults, admission and active ids."""

    def __init__(self, engine: AsyncLLM, server_config: ServerConfig, models: ServingModels) -> None:
        self.engine = engine
        self.server_config = server_config
        self.models = models
        self.tokenizer = engine.tokenizer
        model_config = engine.config.model_config
        self.max_model_len: int = model_config.max_model_len
        self.generation_defaults = load_generation_defaults(
            model_config.model, server_config.generation_config, server_config.override_generation_config)
        self.num_queued = 0
        self.active_ids: set[str] = set()
        self.shutting_down = False

    # ---- ids, admission, logging --------------------------------------------------------------
    def check_request(self, request: Any) -> int:
        """Checks every generating request passes first; returns its n."""
        request.check_supported()
        self.models.check(request.model)
        n = request.n if request.n is not None else 1
        if request.stream and request.best_of is not None and request.best_of > n:
            raise InvalidRequestError("best_of > n cannot be streamed; set stream to false.", param="best_of")
        return n

    def base_request_id(self, raw_request: Request, body_request_id: str | None) -> str:
        return body_request_id or raw_request.headers.get("x-request-id") or random_id()

    def admit(self, requests: list[EngineRequest]) -> None:
        if self.shutting_down or self.engine.is_dead:
            raise EngineDeadError("The server is shutting down." if self.shutting_down else "The engine has stopped.")
        limit = self.server_config.max_num_queued_reqs
        if limit is not None and self.num_queued + len(requests) > limit:
            raise TooManyRequestsError(
                f"The server is busy: {self.num_queued} requests are waiting (--max-num-queued-reqs {limit}). "
                "Retry later.")
        for request in requests:
            if request.request_id in self.active_ids:
                raise InvalidRequestError(f"request_id {request.request_id!r} is already in use.", param="request_id")
        for request in requests:
            self.active_ids.add(request.request_id)
        self.num_queued += len(requests)
        if self.server_config.enable_log_requests:
            for request in requests:
                self.log_request(request)

    def log_request(self, request: EngineRequest) -> None:
        limit = self.server_config.max_log_len
        prompt = request.prompt if isinstance(request.prompt, str) else request.prompt.get("prompt")
        ids = None if isinstance(request.prompt, str) else request.prompt.get("prompt_token_ids")
        if limit is not None:
            prompt = prompt[:limit] if prompt is not None else None
            ids = ids[:limit] if ids is not None else None
        logger.info("Received request %s: prompt: %r, params: %s, prompt_token_ids: %s",
                    request.request_id, prompt, request.params, ids)

    # ---- prompts and parameters ------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if self.tokenizer is None:
            raise InvalidRequestError("This server has no tokenizer (--skip-tokenizer-init): send token ids.",
                                      param="prompt")
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: list[int]) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode(token_ids)

    def resolve_max_tokens(self, requested: int | None, num_prompt_tokens: int) -> int | None:
        """The request's max_tokens; unset: the generation config's max_new_tokens capped to the room
        left in the context, else None (the rest of the context)."""
        if requested is not None:
            return requested
        default = self.generation_defaults.get("max_tokens")
        if default is None:
            return None
        room = self.max_model_len - num_prompt_tokens
        return min(default, room) if room > 0 else default

    async def open_streams(self, requests: list[EngineRequest]) -> EngineStreams:
        streams = EngineStreams(self, requests)
        await streams.open()
        return streams


def streaming_response(chunks: AsyncIterator[str], headers: dict[str, str] | None = None) -> ClosingStreamingResponse:
    return ClosingStreamingResponse(chunks, media_type="text/event-stream", headers=headers)


async def guarded_stream(streams: EngineStreams, produce: Callable[[EngineStreams], AsyncIterator[str]],
                         request_id: str) -> AsyncIterator[str]:
    """Run `produce`, turn a mid-stream failure into an error event, always end with [DONE], always abort."""
    try:
        async for chunk in produce(streams):
            yield chunk
    except Exception as exc:
        yield stream_error_event(exc, request_id)
    finally:
        streams.close()
    yield SSE_DONE


def unix_time() -> int:
    return int(time.time())



def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
