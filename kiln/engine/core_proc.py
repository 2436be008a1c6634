"""The engine core in its own process: the server's scheduler, model runner and sampler run here,
and the frontend process keeps HTTP, tokenization and detokenization (vLLM's EngineCoreProc).

Two processes stop the event loop and the step loop from taking turns on one GIL: with the model on
a GPU, a step's host work (scheduling, input preparation, sampling) and the server's per-token work
(SSE, JSON, detokenization) then run at the same time on two cores.

The loop: apply every message waiting on the pipe (additions, aborts, profiler calls), run a step
when there is work, send its outputs with the stats of the step; with no work, fault in KV cache
memory a piece at a time, then block on the pipe. The frontend's end of the pipe closing (it exited
or was killed) ends the process.
"""

from __future__ import annotations

import importlib
import signal
import traceback
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from kiln.config import EngineConfig
from kiln.core.outputs import EngineCoreOutput
from kiln.core.request import EngineCoreRequest
from kiln.engine.wire import RequestDecoder, dumps, loads
from kiln.errors import KilnError
from kiln.logger import init_logger
from kiln.tokenizer import tokenizer_for

if TYPE_CHECKING:
    from kiln.engine.core import EngineCore

logger = init_logger(__name__)


def run_engine_core(conn: Connection) -> None:
    """The core process's main: wait for the EngineConfig (the frontend starts this process before
    it has one, so these imports overlap its own), build the core, report ("ready", None) or
    ("failed", the exception), then serve the frontend until it says shutdown or goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the frontend stops us
    # Imported here, not at the top: the frontend imports this module only to name this function.
    from kiln.engine.core import EngineCore

    importlib.import_module("transformers.configuration_utils")  # what unpickling the config needs

    try:
        config: EngineConfig = loads(conn.recv_bytes())
    except EOFError:  # the frontend gave up before sending one
        return
    try:
        core = EngineCore(config)
    except Exception as exc:  # raised again in the frontend: a KilnError stays one clear line
        if not isinstance(exc, KilnError):  # a bug: its traceback stays here, in the log
            logger.exception("Building the engine core failed")
        conn.send_bytes(dumps(("failed", _picklable(exc))))
        return
    conn.send_bytes(dumps(("ready", None)))
    EngineCoreProc(core, config, conn).run()


class EngineCoreProc:
    def __init__(self, core: EngineCore, config: EngineConfig, conn: Connection) -> None:
        self.core = core
        self.conn = conn
        self.decoder = RequestDecoder(config.model_config.vocab_size, lambda: tokenizer_for(config.model_config))
        self.stopping = False
        self.aborts_applied = 0
        """Abort messages applied since the last outputs message, which acknowledges them."""

    def run(self) -> None:
        idle_work = True
        try:
            while not self.stopping:
                if not self.core.has_unfinished_requests():
                    if idle_work and not self.conn.poll(0):
                        idle_work = self.core.do_idle_work()
                        continue
                    self.conn.poll(None)
                self._apply_messages()
                if self.core.has_unfinished_requests():
                    self._send_outputs(self.core.step())
                elif self.aborts_applied:
                    self._send_outputs([])  # the frontend waits to hear its aborts were applied
        except (EOFError, BrokenPipeError, ConnectionResetError):
            logger.info("The frontend went away; the engine core process exits")
        except BaseException:
            logger.exception("The engine core loop failed; the engine is dead")
            try:
                self.conn.send_bytes(dumps(("dead", traceback.format_exc())))
            except OSError:
                pass

    def _apply_messages(self) -> None:
        while not self.stopping and self.conn.poll(0):
            kind, payload = loads(self.conn.recv_bytes())
            if kind == "add":
                self._add(payload)
            elif kind == "abort":
                req_ids, status = payload
                self.core.abort_requests(req_ids, status)
                self.aborts_applied += 1
            elif kind == "call":
                call_id, method = payload
                self._reply(call_id, method)
            elif kind == "shutdown":
                self.stopping = True
            else:
                raise ValueError(f"unknown message {kind!r} from the frontend")

    def _add(self, encoded: list[tuple[str, bytes]]) -> None:
        """Admit requests, each decoded on its own: one that cannot be (its reasoning parser's class
        exists only in the frontend, say) is refused alone, with an abort."""
        refused = []
        for req_id, data in encoded:
            try:
                request: EngineCoreRequest = self.decoder.loads(data)
            except Exception:
                logger.exception("Request %s could not be decoded in the engine core process; aborting it", req_id)
                refused.append(EngineCoreOutput(req_id=req_id, new_token_ids=[], finish_reason="abort"))
                continue
            self.core.add_request(request)
        if refused:
            self._send_outputs(refused)

    def _reply(self, call_id: int, method: str) -> None:
        try:
            getattr(self.core, method)()
            error: BaseException | None = None
        except Exception as exc:
            error = exc
        self.conn.send_bytes(dumps(("reply", (call_id, _picklable(error)))))

    def _send_outputs(self, outputs: list[EngineCoreOutput]) -> None:
        payload = (outputs, self.core.take_iteration_stats(), self.core.make_scheduler_stats(), self.aborts_applied)
        self.aborts_applied = 0
        self.conn.send_bytes(dumps(("outputs", payload)))


def _picklable(exc: BaseException | None) -> BaseException | None:
    """`exc` if it survives pickling, else a RuntimeError with its text and type."""
    try:
        loads(dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
