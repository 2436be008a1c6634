"""The engine core: the schedule -> execute -> update loop, one step at a time.

It owns the scheduler and the worker. It runs in the caller's process for the offline `LLM` (and
for the server with --disable-frontend-multiprocessing); core_proc.py runs the same object in a
process of its own for the server. An exception inside a step fails the requests of that step,
not the engine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from kiln.config import EngineConfig
from kiln.core.outputs import EngineCoreOutput
from kiln.core.request import Request, RequestStatus
from kiln.core.scheduler import Scheduler
from kiln.core.stats import SchedulerStats
from kiln.engine.profiler import StepProfiler
from kiln.logger import init_logger
from kiln.metrics.stats import IterationStats, RequestStatsTracker
from kiln.sampling.params import SamplingParams
from kiln.worker.worker import Worker

logger = init_logger(__name__)


@dataclass(slots=True)
class EngineCoreRequest:
    """A validated, tokenized request as the core receives it."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None
    max_tokens: int
    arrival_time: float
    priority: int = 0
    prefill_leader_id: str | None = None


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.worker = Worker(config)
        self.scheduler = Scheduler(config.scheduler_config, config.cache_config, self.worker.num_blocks)
        self.num_steps = 0
        self.stats_tracker = RequestStatsTracker()
        self._pending_stats = IterationStats()
        self.profiler = StepProfiler()

    def add_request(self, request: EngineCoreRequest) -> None:
        self.stats_tracker.on_arrival(request.request_id, request.arrival_time, len(request.prompt_token_ids))
        self.scheduler.add_request(Request(
            request_id=request.request_id, prompt_token_ids=request.prompt_token_ids,
            sampling_params=request.sampling_params, eos_token_id=request.eos_token_id,
            arrival_time=request.arrival_time, priority=request.priority, max_tokens=request.max_tokens,
            prefill_leader_id=request.prefill_leader_id,
        ))

    def abort_requests(self, req_ids: list[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> None:
        if req_ids:
            self.scheduler.finish_requests(req_ids, status)
            reason = RequestStatus.finish_reason(status) or "abort"
            self._pending_stats.merge(self.stats_tracker.on_finished_outside_step(req_ids, reason, time.monotonic()))

    def take_iteration_stats(self) -> IterationStats:
        """What happened since the last call: the steps' outputs and the requests ended between steps."""
        stats, self._pending_stats = self._pending_stats, IterationStats()
        return stats

    def make_scheduler_stats(self) -> SchedulerStats:
        return self.scheduler.make_stats()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def check_health(self) -> None:
        """Nothing to check: this core fails by raising from `step()` (EngineCoreClient's counterpart)."""

    def wake(self) -> None:
        """Nothing to wake: this core steps on its caller's thread (EngineCoreClient's counterpart)."""

    def shutdown(self) -> None:
        """Nothing to stop: this core lives in the caller's process (EngineCoreClient's counterpart)."""

    def start_profile(self) -> None:
        """Trace the steps from now on (needs KILN_TORCH_PROFILER_DIR); call from the stepping thread."""
        self.profiler.start()

    def stop_profile(self) -> None:
        self.profiler.stop()

    def do_idle_work(self) -> bool:
        """Work for the gaps between requests (faulting in KV cache memory ahead of use), one short
        piece per call; False when there is none left."""
        return self.worker.prefault_kv_cache_chunk()

    def step(self) -> list[EngineCoreOutput]:
        """Run one step; returns the outputs of every request that progressed or finished."""
        if not self.scheduler.has_unfinished_requests():
            return []
        sched_output = self.scheduler.schedule()
        self.stats_tracker.on_scheduled([r.req_id for r in sched_output.scheduled_new_reqs], time.monotonic())
        try:
            runner_output = self.worker.execute_model(sched_output)
        except Exception:
            failed = list(sched_output.num_scheduled_tokens)
            logger.exception("Step %d failed; aborting its requests %s", self.num_steps, failed)
            self.abort_requests(failed)
            return [EngineCoreOutput(req_id=r, new_token_ids=[], finish_reason="abort") for r in failed]
        self.num_steps += 1
        outputs = self.scheduler.update_from_output(sched_output, runner_output)
        self._pending_stats.merge(self.stats_tracker.on_outputs(outputs, time.monotonic()))
        return outputs
