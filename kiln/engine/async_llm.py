"""The asyncio front of the engine, used by the HTTP server.

`AsyncLLM.add_request()` validates a request on the caller's event loop (so a bad request fails
at once, with no engine involved), hands it to the engine thread and returns the stream its
RequestOutputs arrive on; a reader that falls behind gets the latest output only.
`generate()` iterates that stream; leaving it early (a client disconnect cancels the task)
aborts the request, which returns its KV blocks. The engine thread owns all engine
state: additions and aborts reach it through a queue and are applied between steps, so the
event loop never waits for a step. An exception escaping a step kills the engine: every open
request gets EngineDeadError and later calls fail fast. While no request is in flight the thread
faults in KV cache memory ahead of use, one short piece at a time (`EngineCore.do_idle_work`), so
a request that arrives then waits ~10 ms at most.

With `core_process` (the server's default) the scheduler, model runner and sampler run in a
process of their own (core_proc.py) and the engine thread here keeps the output processing
(detokenization, stop strings): it waits on that process's outputs, and `_send` wakes it so
additions and aborts go out at once.

The engine is also *built* on its thread. OpenMP gives every thread that starts parallel work its
own team of workers; had the model been loaded on the main thread, that idle team would count
against the cores, libgomp would stop spinning between parallel regions, and every step would pay
thread wake-ups (measured: a batch-1 decode step 40 ms instead of 18). So the main thread never
runs torch's parallel kernels.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from collections.abc import AsyncIterator
from typing import Any

from kiln.config import EngineArgs, EngineConfig
from kiln.engine.core_client import EngineCoreClient
from kiln.engine.input_processor import PromptType
from kiln.engine.llm_engine import LLMEngine
from kiln.errors import EngineDeadError
from kiln.logger import init_logger
from kiln.metrics.stats_logger import StatLoggerProtocol
from kiln.outputs import RequestOutput
from kiln.sampling.params import SamplingParams

logger = init_logger(__name__)


class AsyncLLM:
    def __init__(self, config: EngineConfig, core_client: EngineCoreClient | None = None) -> None:
        """`core_client`: the engine core runs in the process that client started (core_proc.py);
        the engine thread here then does the output processing only."""
        self.config = config
        self._core_client = core_client
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._work = threading.Event()
        self._stopped = False
        self._dead: BaseException | None = None
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, RequestOutputStream]] = {}
        self._built = threading.Event()
        self._build_error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="kiln-engine", daemon=True)
        self._thread.start()
        self._built.wait()
        if self._build_error is not None:
            raise self._build_error

    def _main(self) -> None:
        try:
            self.engine = LLMEngine(self.config, self._core_client)
        except BaseException as exc:  # reported by __init__ on the caller's thread
            self._build_error = exc
            return
        finally:
            self._built.set()
        self._run()

    @classmethod
    def from_engine_args(cls, args: EngineArgs, core_process: bool = False) -> AsyncLLM:
        """`core_process`: the engine core in a process of its own, started first so that its
        imports overlap building the config here."""
        client = EngineCoreClient() if core_process else None
        try:
            config = args.create_engine_config()
        except BaseException:
            if client is not None:
                client.shutdown()
            raise
        return cls(config, client)

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def is_dead(self) -> bool:
        return self._dead is not None

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._streams)

    def add_stat_logger(self, stat_logger: StatLoggerProtocol) -> None:
        """Also report every step's stats to `stat_logger` (e.g. the Prometheus collectors)."""
        self.engine.stat_loggers.append(stat_logger)

    def add_request(self, prompt: PromptType, sampling_params: SamplingParams, request_id: str, priority: int = 0,
                    wake: asyncio.Event | None = None) -> RequestOutputStream:
        """Validate and tokenize a request on the caller's event loop, queue it for the engine thread,
        and return the stream its outputs arrive on (the caller aborts it if it stops reading).

        Raises InvalidRequestError (bad input) before anything is queued. `wake` is set whenever
        the stream gets an item (one event can watch the streams of several requests)."""
        if self._dead is not None or self._stopped:
            raise EngineDeadError(f"The engine is not running: {self._dead or 'shut down'}")
        if request_id in self._streams:
            raise ValueError(f"Request id {request_id!r} is already in use.")
        processor = self.engine.input_processor
        processed = processor.tokenize(prompt, sampling_params)
        core_requests = processor.process(request_id, processed, sampling_params, priority)
        stream = RequestOutputStream(request_id, wake)
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._send("add", (request_id, processed, sampling_params, core_requests))
        return stream

    async def generate(
        self, prompt: PromptType, sampling_params: SamplingParams, request_id: str, priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Yield cumulative RequestOutputs for one request until it finishes (the last has finished=True);
        a reader that falls behind gets the latest output only. Leaving early aborts the request.

        Raises InvalidRequestError (bad input) before anything is queued."""
        stream = self.add_request(prompt, sampling_params, request_id, priority)
        try:
            async for output in stream:
                yield output
        finally:
            if not stream.finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request wherever it is; the engine thread frees its blocks before the next step."""
        if self._streams.pop(request_id, None) is not None:
            self._send("abort", request_id)

    async def start_profile(self) -> None:
        """Start the torch profiler on the engine thread (KILN_TORCH_PROFILER_DIR)."""
        await self._call_on_engine_thread("start_profile")

    async def stop_profile(self) -> None:
        await self._call_on_engine_thread("stop_profile")

    async def _call_on_engine_thread(self, method: str) -> None:
        if self._dead is not None or self._stopped:  # no thread would ever answer
            raise EngineDeadError(f"The engine is not running: {self._dead or 'shut down'}")
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._send("call", (method, done))
        await asyncio.wrap_future(done)

    def _send(self, command: str, payload: Any) -> None:
        self._commands.put((command, payload))
        self._work.set()
        self.engine.core.wake()  # a separate core process's client may be waiting for its outputs

    def _apply_commands(self) -> int:
        """Apply queued additions and aborts; returns how many there were."""
        applied = 0
        while True:
            try:
                command, payload = self._commands.get_nowait()
            except queue.Empty:
                return applied
            applied += 1
            if command == "call":  # an engine method that must run where the steps run
                method, done = payload
                try:
                    done.set_result(getattr(self.engine, method)())
                except Exception as exc:
                    done.set_exception(exc)
            elif command == "add":
                request_id = payload[0]
                if request_id in self._streams:  # not aborted while queued
                    self.engine.add_processed_request(*payload)
            else:
                self.engine.abort_request(payload)
                logger.debug("Aborted request %s", payload)

    def _deliver_all(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        """Hand outputs to their streams with one wake-up per event loop, not one per request: each
        `call_soon_threadsafe` writes to the loop's self-pipe, 64 writes and callbacks a step at 64
        running requests, on the cores the step needs."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[RequestOutputStream, RequestOutput | BaseException]]] = {}
        for request_id, item in items:
            entry = self._streams.get(request_id)
            if entry is None:
                continue
            loop, stream = entry
            if isinstance(item, BaseException) or item.finished:
                self._streams.pop(request_id, None)
            batches.setdefault(loop, []).append((stream, item))
        for loop, batch in batches.items():
            loop.call_soon_threadsafe(_put_all, batch)

    def _run(self) -> None:
        idle_work = True
        while not self._stopped:
            try:
                applied = self._apply_commands()
                if not self.engine.has_unfinished_requests():
                    if applied:
                        self.engine.record_stats()  # e.g. the last request was just aborted
                    if idle_work and not self._work.is_set():  # a short piece, then look for requests again
                        idle_work = self.engine.do_idle_work()
                        continue
                    self._work.wait(timeout=1.0)
                    self._work.clear()
                    self.engine.core.check_health()  # a core process that died idle fails /health too
                    continue
                self._deliver_all([(output.request_id, output) for output in self.engine.step()])
            except BaseException as exc:  # the step loop itself broke: fail every request, stop serving
                logger.exception("The engine step loop failed; the engine is dead")
                self._dead = exc
                self._deliver_all([(request_id, EngineDeadError(f"The engine failed: {exc}"))
                                   for request_id in list(self._streams)])
                self.engine.shutdown()
                return
        self._deliver_all([(request_id, EngineDeadError("The server is shutting down."))
                           for request_id in list(self._streams)])
        self._apply_commands()
        for request_id in list(self.engine.output_processor.parents):
            self.engine.abort_request(request_id)
        self.engine.shutdown()

    def shutdown(self) -> None:
        """Answer every request in flight with EngineDeadError, free its blocks, stop the step loop
        (and the engine core process, if there is one)."""
        self._stopped = True
        self._work.set()
        self.engine.core.wake()
        self._thread.join(timeout=30)


class RequestOutputStream:
    """The outputs of one request, as its reader sees them (all methods on the reader's event loop).

    Outputs are cumulative, so a reader that falls behind the engine needs only the latest: a new
    output replaces one not yet read (as vLLM's output collector does). Under load the HTTP layer
    then formats, encodes and writes one chunk per request per read instead of one per step, and
    what it cannot keep up with is merged instead of queued. An error is delivered after the output
    pending before it.
    """

    def __init__(self, request_id: str, wake: asyncio.Event | None = None) -> None:
        self.request_id = request_id
        self.wake = wake if wake is not None else asyncio.Event()
        self._output: RequestOutput | None = None
        self._error: BaseException | None = None
        self.finished = False
        """The final output or an error has been taken: nothing more will come."""

    def put(self, item: RequestOutput | BaseException) -> None:
        if isinstance(item, BaseException):
            self._error = item
        else:
            self._output = item
        self.wake.set()

    @property
    def ready(self) -> bool:
        return self._output is not None or self._error is not None

    def take(self) -> RequestOutput | None:
        """The latest output not yet taken, or None; raises the error once the outputs are taken."""
        output, self._output = self._output, None
        if output is not None:
            self.finished = output.finished
            return output
        if self._error is not None:
            error, self._error = self._error, None
            self.finished = True
            raise error
        return None

    def __aiter__(self) -> RequestOutputStream:
        return self

    async def __anext__(self) -> RequestOutput:
        while not self.finished:
            output = self.take()
            if output is not None:
                return output
            self.wake.clear()
            await self.wake.wait()
        raise StopAsyncIteration


def _put_all(batch: list[tuple[RequestOutputStream, RequestOutput | BaseException]]) -> None:
    for stream, item in batch:
        stream.put(item)
