"""The synchronous engine behind the offline `LLM`: input processing, the core, output processing.

Everything runs in the caller's process and thread; `step()` advances every request by one
engine step and returns the RequestOutputs that changed. The server's AsyncLLM drives the same
class on its engine thread, with the core either in-process or in its own process
(`core_client`): then `step()` returns what the core process sent since the last call.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from kiln.config import EngineArgs, EngineConfig
from kiln.core.request import EngineCoreRequest, RequestStatus
from kiln.engine.core_client import EngineCoreClient
from kiln.engine.input_processor import InputProcessor, ProcessedPrompt, PromptType
from kiln.engine.output_processor import OutputProcessor
from kiln.logger import init_logger
from kiln.metrics.stats_logger import StatLogger, StatLoggerProtocol
from kiln.outputs import RequestOutput
from kiln.sampling.params import SamplingParams
from kiln.tokenizer import eos_token_id_of, tokenizer_for

if TYPE_CHECKING:
    from kiln.engine.core import EngineCore

logger = init_logger(__name__)


def _in_process_core(config: EngineConfig) -> EngineCore:
    """Imported here: a server's frontend, whose core runs in another process, never loads the
    model runner and its dependencies (a few seconds of imports before that process could start)."""
    from kiln.engine.core import EngineCore

    return EngineCore(config)


class LLMEngine:
    def __init__(self, config: EngineConfig, core_client: EngineCoreClient | None = None) -> None:
        """`core_client`: run the engine core in the process that client started (the server's
        default), not in this one."""
        self.config = config
        mc = config.model_config
        start = time.perf_counter()
        try:
            if core_client is not None:
                core_client.start(config)  # the model loads there while the tokenizer loads here
            self.tokenizer = tokenizer_for(mc)
            self.core: EngineCore | EngineCoreClient = (
                core_client.connect(self.tokenizer) if core_client is not None else _in_process_core(config))
        except BaseException:
            if core_client is not None:
                core_client.shutdown()
            raise
        self.eos_token_id = eos_token_id_of(self.tokenizer, mc.hf_config)
        self.input_processor = InputProcessor(config, self.tokenizer, self.eos_token_id)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.stat_loggers: list[StatLoggerProtocol] = [] if config.disable_log_stats else [StatLogger()]
        logger.info(
            "Engine ready in %.1fs on %s: model %s (%s), dtype %s, max_model_len %d",
            time.perf_counter() - start, config.device_config.device, mc.served_model_name, mc.architecture,
            mc.dtype, mc.max_model_len,
        )

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        return cls(args.create_engine_config())

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams, priority: int = 0,
                    final_only: bool = False) -> None:
        """`final_only`: `step` reports the request only when it finishes, not after every token."""
        if request_id in self.output_processor.parents:
            raise ValueError(f"Request id {request_id!r} is already in use.")
        processed = self.input_processor.tokenize(prompt, params)
        core_requests = self.input_processor.process(request_id, processed, params, priority)
        self.add_processed_request(request_id, processed, params, core_requests, final_only)

    def add_processed_request(
        self, request_id: str, processed: ProcessedPrompt, params: SamplingParams,
        core_requests: list[EngineCoreRequest], final_only: bool = False,
    ) -> None:
        """Admit a request the input processor already validated (the async front validates on its
        own thread, then hands the result to the engine thread)."""
        self.output_processor.add_request(request_id, processed.prompt, processed.prompt_token_ids, params,
                                          final_only)
        for request in core_requests:
            self.core.add_request(request)

    def abort_request(self, request_ids: str | list[str]) -> None:
        ids = [request_ids] if isinstance(request_ids, str) else request_ids
        for request_id in ids:
            self.core.abort_requests(self.output_processor.child_ids(request_id))
            self.output_processor.abort_request(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    def do_idle_work(self) -> bool:
        """See EngineCore.do_idle_work: for a caller with time on its hands (the async front)."""
        return self.core.do_idle_work()

    def start_profile(self) -> None:
        """Trace the steps from now on (needs KILN_TORCH_PROFILER_DIR); call from the stepping thread."""
        self.core.start_profile()

    def stop_profile(self) -> None:
        self.core.stop_profile()

    def step(self) -> list[RequestOutput]:
        core_outputs = self.core.step()
        request_outputs, stopped = self.output_processor.process_outputs(core_outputs)
        self.core.abort_requests(stopped, RequestStatus.FINISHED_STOPPED)
        self.record_stats()
        return request_outputs

    def shutdown(self) -> None:
        self.core.shutdown()

    def record_stats(self) -> None:
        """Hand what happened since the last call to the stat loggers (every step, and when the engine
        goes idle, so gauges such as running requests fall back to 0 after the last abort)."""
        iteration_stats = self.core.take_iteration_stats()  # taken even without loggers: nothing piles up
        if self.stat_loggers:
            scheduler_stats = self.core.make_scheduler_stats()
            for stat_logger in self.stat_loggers:
                stat_logger.record(scheduler_stats, iteration_stats)
