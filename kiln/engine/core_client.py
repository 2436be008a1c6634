"""The frontend's handle on an engine core running in its own process (see core_proc.py).

`EngineCoreClient` offers what LLMEngine uses of an in-process EngineCore (add, abort, step,
stats, the profiler), so the same LLMEngine, with its input and output processing, drives either.
Here `step()` does not run a step: it waits for the core process's next outputs, or for `wake()`
(the frontend has additions or aborts to send), and returns what arrived, possibly several steps'
worth. The process is started with `spawn`: a forked child would inherit torch's thread pools and
the frontend's threads in whatever state they were.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from multiprocessing.connection import wait
from typing import Any

from kiln.config import EngineConfig
from kiln.core.outputs import EngineCoreOutput
from kiln.core.request import EngineCoreRequest, RequestStatus
from kiln.core.stats import SchedulerStats
from kiln.engine.core_proc import run_engine_core
from kiln.engine.wire import RequestEncoder, dumps, loads
from kiln.errors import EngineDeadError
from kiln.logger import init_logger
from kiln.metrics.stats import IterationStats

logger = init_logger(__name__)

_SHUTDOWN_TIMEOUT_S = 10.0


class EngineCoreClient:
    """Started in three moves, so that the core process's work overlaps the frontend's: the
    constructor starts the process (its imports run while the caller builds the EngineConfig),
    `start(config)` has it build the engine core (the model loads while the caller loads the
    tokenizer), and `connect(tokenizer)` waits for it."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe(duplex=True)
        self._process = context.Process(target=run_engine_core, args=(child_conn,),
                                        name="kiln-engine-core", daemon=True)
        self._process.start()
        child_conn.close()  # ours closed, the pipe reads EOF once the child's end goes
        self._encoder = RequestEncoder(None)
        self._ready = False
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._unfinished: set[str] = set()
        self._unacked_aborts = 0
        self._arrived: list[EngineCoreOutput] = []
        self._replies: dict[int, BaseException | None] = {}
        self._next_call_id = 0
        self._iteration_stats = IterationStats()
        self._scheduler_stats = SchedulerStats(0, 0, 0.0, 0, 0, 0)
        self._dead: str | None = None
        self._closed = False
        self._wake_lock = threading.Lock()

    def start(self, config: EngineConfig) -> None:
        self._send_raw(dumps(config))

    def connect(self, tokenizer: Any | None) -> EngineCoreClient:
        """Wait until the core process has built its engine core; `tokenizer` is the frontend's
        (requests refer to it, see wire.py)."""
        self._encoder.tokenizer = tokenizer
        try:
            kind, payload = self._receive()
        except EngineDeadError as exc:
            raise RuntimeError(f"The engine core process failed to start: {exc}") from None
        if kind != "ready":
            self._process.join(timeout=_SHUTDOWN_TIMEOUT_S)
            raise payload  # what building the core raised there (say, a KV cache too small)
        self._ready = True
        logger.info("Engine core running in process %d", self._process.pid)
        return self

    def add_request(self, request: EngineCoreRequest) -> None:
        try:
            encoded = self._encoder.dumps(request)
        except Exception:  # say, a parser object holding a lambda: this request fails, not the engine
            logger.exception("Request %s cannot be sent to the engine core process; aborting it", request.request_id)
            self._arrived.append(EngineCoreOutput(req_id=request.request_id, new_token_ids=[], finish_reason="abort"))
            return
        self._unfinished.add(request.request_id)
        self._send(("add", [(request.request_id, encoded)]))

    def abort_requests(self, req_ids: list[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> None:
        self._unfinished.difference_update(req_ids)
        if req_ids and self._dead is None:  # a dead core holds nothing any more
            self._unacked_aborts += 1
            self._send(("abort", (req_ids, status)))

    def has_unfinished_requests(self) -> bool:
        """Requests in flight, or aborts whose effect on the stats has not come back yet."""
        return bool(self._unfinished or self._unacked_aborts or self._arrived)

    def do_idle_work(self) -> bool:
        return False  # the core process does its own between requests

    def check_health(self) -> None:
        """Raise EngineDeadError if the core process has exited (noticed while idle, not only when
        the next request finds the pipe closed)."""
        if self._dead is None and not self._process.is_alive():
            self._dead = f"The engine core process exited (exit code {self._process.exitcode})"
        if self._dead is not None:
            raise EngineDeadError(self._dead)

    def wake(self) -> None:
        """Make a waiting `step()` return now (callable from any thread)."""
        with self._wake_lock:  # not racing the close of the pipe (shutdown runs on another thread)
            if self._closed:
                return
            try:
                os.write(self._wake_write, b"\0")
            except BlockingIOError:  # the pipe is full of wake-ups already
                pass

    def step(self) -> list[EngineCoreOutput]:
        """Wait for outputs or a `wake()`; returns the outputs that arrived (maybe none)."""
        if not self._arrived:
            ready = wait([self._conn, self._wake_read])
            if self._wake_read in ready:
                _drain(self._wake_read)
        while self._conn.poll(0):
            self._handle(*self._receive())
        outputs, self._arrived = self._arrived, []
        return outputs

    def take_iteration_stats(self) -> IterationStats:
        stats, self._iteration_stats = self._iteration_stats, IterationStats()
        return stats

    def make_scheduler_stats(self) -> SchedulerStats:
        return self._scheduler_stats

    def start_profile(self) -> None:
        self._call("start_profile")

    def stop_profile(self) -> None:
        self._call("stop_profile")

    def shutdown(self) -> None:
        """Stop the core process (it drops whatever it still holds) and wait for it to exit."""
        if self._process.is_alive() and not self._ready:  # still building: nothing to wind down
            self._process.terminate()
            self._process.join(timeout=_SHUTDOWN_TIMEOUT_S)
        if self._process.is_alive():
            try:
                self._send(("shutdown", None))
            except EngineDeadError:
                pass
            self._process.join(timeout=_SHUTDOWN_TIMEOUT_S)
            if self._process.is_alive():
                logger.warning("The engine core process did not stop; terminating it")
                self._process.terminate()
                self._process.join(timeout=_SHUTDOWN_TIMEOUT_S)
        with self._wake_lock:
            if not self._closed:
                self._closed = True
                self._conn.close()
                for fd in (self._wake_read, self._wake_write):
                    os.close(fd)

    def _call(self, method: str) -> None:
        """Run `method` on the core between its steps and wait for it; outputs arriving meanwhile
        are kept for the next `step()`."""
        call_id = self._next_call_id
        self._next_call_id += 1
        self._send(("call", (call_id, method)))
        while call_id not in self._replies:
            self._handle(*self._receive())
        error = self._replies.pop(call_id)
        if error is not None:
            raise error

    def _send(self, message: tuple[str, Any]) -> None:
        self._send_raw(dumps(message))

    def _send_raw(self, data: bytes) -> None:
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        try:
            self._conn.send_bytes(data)
        except (BrokenPipeError, ConnectionResetError, EOFError) as exc:
            raise self._died(exc) from exc

    def _receive(self) -> tuple[str, Any]:
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        try:
            return loads(self._conn.recv_bytes())
        except (EOFError, ConnectionResetError) as exc:
            raise self._died(exc) from exc

    def _died(self, exc: BaseException) -> EngineDeadError:
        self._process.join(timeout=1.0)
        self._dead = f"The engine core process exited (exit code {self._process.exitcode}): {exc!r}"
        return EngineDeadError(self._dead)

    def _handle(self, kind: str, payload: Any) -> None:
        if kind == "outputs":
            outputs, iteration_stats, scheduler_stats, acked_aborts = payload
            for output in outputs:
                if output.finish_reason is not None:
                    self._unfinished.discard(output.req_id)
            self._arrived.extend(outputs)
            self._iteration_stats.merge(iteration_stats)
            self._scheduler_stats = scheduler_stats
            self._unacked_aborts -= acked_aborts
        elif kind == "reply":
            call_id, error = payload
            self._replies[call_id] = error
        elif kind == "dead":
            self._dead = f"The engine core process failed:\n{payload}"
            raise EngineDeadError(self._dead)
        else:
            raise EngineDeadError(f"unknown message {kind!r} from the engine core process")


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass
