"""The engine core: the schedule -> execute -> update loop, one step at a time.

With asynchronous scheduling the loop runs one step ahead: schedule and launch step N+1, then
read back and process step N while the device computes N+1 (core/scheduler.py says how the
scheduler plans with tokens it has not seen).

It owns the scheduler and the worker. It runs in the caller's process for the offline `LLM` (and
for the server with --disable-frontend-multiprocessing); core_proc.py runs the same object in a
process of its own for the server. An exception inside a step fails the requests of that step,
not the engine.
"""

from __future__ import annotations

import time

from kiln.config import EngineConfig
from kiln.core.outputs import EngineCoreOutput, ModelRunnerOutput
from kiln.core.request import EngineCoreRequest, Request, RequestStatus
from kiln.core.sched_output import SchedulerOutput
from kiln.core.scheduler import Scheduler
from kiln.core.stats import SchedulerStats
from kiln.engine.profiler import StepProfiler
from kiln.logger import init_logger
from kiln.metrics.stats import IterationStats, RequestStatsTracker
from kiln.worker.model_runner import LaunchedStep
from kiln.worker.worker import Worker

logger = init_logger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.worker = Worker(config)
        self.scheduler = Scheduler(config.scheduler_config, config.cache_config, self.worker.num_blocks)
        self.num_steps = 0
        self.stats_tracker = RequestStatsTracker()
        self._pending_stats = IterationStats()
        self.profiler = StepProfiler()
        self.async_scheduling = config.scheduler_config.async_scheduling
        self._in_flight: tuple[SchedulerOutput, LaunchedStep] | None = None
        """Async scheduling: the launched step not yet processed."""

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
        return self.scheduler.has_unfinished_requests() or self._in_flight is not None

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
        """Run one step; returns the outputs of every request that progressed or finished (with
        async scheduling: of the step launched by the previous call)."""
        if self.async_scheduling:
            return self._step_ahead()
        if not self.scheduler.has_unfinished_requests():
            return []
        sched_output = self._schedule()
        try:
            runner_output = self.worker.execute_model(sched_output)
        except Exception:
            return self._fail_step(sched_output)
        return self._process(sched_output, runner_output)

    def _step_ahead(self) -> list[EngineCoreOutput]:
        outputs: list[EngineCoreOutput] = []
        launched = None
        sched_output = self._schedule() if self.scheduler.has_unfinished_requests() else None
        # Nothing to run (every running request's last token is out) and nothing to drop: no step.
        if sched_output is not None and (not sched_output.is_empty or sched_output.finished_req_ids):
            try:
                launched = (sched_output, self.worker.launch_step(sched_output))
            except Exception:
                outputs = self._fail_step(sched_output)
        if self._in_flight is not None:
            previous, step = self._in_flight
            try:
                runner_output = step.result()
            except Exception:
                outputs += self._fail_step(previous)
            else:
                outputs += self._process(previous, runner_output)
        self._in_flight = launched
        return outputs

    def _schedule(self) -> SchedulerOutput:
        sched_output = self.scheduler.schedule()
        self.stats_tracker.on_scheduled([r.req_id for r in sched_output.scheduled_new_reqs], time.monotonic())
        return sched_output

    def _process(self, sched_output: SchedulerOutput, runner_output: ModelRunnerOutput) -> list[EngineCoreOutput]:
        self.num_steps += 1
        outputs = self.scheduler.update_from_output(sched_output, runner_output)
        self._pending_stats.merge(self.stats_tracker.on_outputs(outputs, time.monotonic()))
        return outputs

    def _fail_step(self, sched_output: SchedulerOutput) -> list[EngineCoreOutput]:
        """Abort the requests of a step that raised (those still alive), not the engine."""
        failed = [r for r in sched_output.num_scheduled_tokens if self.scheduler.get_request(r) is not None]
        logger.exception("Step %d failed; aborting its requests %s", self.num_steps, failed)
        self.abort_requests(failed)
        return [EngineCoreOutput(req_id=r, new_token_ids=[], finish_reason="abort") for r in failed]
