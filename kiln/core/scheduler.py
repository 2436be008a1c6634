"""Who runs each step and with how many tokens: the scheduler of the engine core.

Owns the waiting queue, the running list and every request's state transitions. One rule in
place of prefill/decode phases (vLLM V1): each step has a token budget
(`max_num_batched_tokens`) and a sequence cap (`max_num_seqs`); running requests get their next
tokens first (a decode, or the next prefill chunk), then waiting requests are admitted while
budget, cap and KV blocks last. When a running request cannot get a block, the lowest-priority
running request is preempted by recompute. `update_from_output` advances computed tokens,
appends sampled tokens, applies the stop rules and frees finished requests.

Asynchronous scheduling (`--async-scheduling`, as vLLM's): the engine core schedules step N+1
before it has processed step N's output, so that the device never waits for the host. A request
then runs from `num_started_tokens` (computed plus in flight), and a token step N will sample
counts as a placeholder: step N+1 decodes it without knowing its id (the runner feeds it from the
device). A request whose placeholders reach its length cap is not scheduled again; one that step
N finds stopped (EOS, a stop token) has run one step too many, whose output is dropped. In
synchronous mode every step is processed before the next is scheduled, so both counts are 0 there.
Pure Python, deterministic, no torch.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from kiln.core.kv_cache_manager import KVCacheManager
from kiln.core.outputs import EngineCoreOutput, ModelRunnerOutput
from kiln.core.request import Request, RequestStatus
from kiln.core.sched_output import CachedRequestData, NewRequestData, SchedulerOutput
from kiln.core.stats import SchedulerStats
from kiln.logger import init_logger

if TYPE_CHECKING:
    from kiln.config import CacheConfig, SchedulerConfig

logger = init_logger(__name__)


class FCFSQueue:
    """Waiting requests in arrival order; preempted ones go back to the front."""

    def __init__(self) -> None:
        self._queue: deque[Request] = deque()

    def add(self, request: Request) -> None:
        self._queue.append(request)

    def prepend(self, requests: list[Request]) -> None:
        """Put `requests` back in front, keeping their order."""
        self._queue.extendleft(reversed(requests))

    def peek(self) -> Request:
        return self._queue[0]

    def pop(self) -> Request:
        return self._queue.popleft()

    def remove(self, request: Request) -> None:
        self._queue.remove(request)

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._queue)


class PriorityQueue:
    """Waiting requests ordered by (priority, arrival_time), lower first; ties by insertion."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, float, int, Request]] = []
        self._counter = itertools.count()

    def add(self, request: Request) -> None:
        heapq.heappush(self._heap, (request.priority, request.arrival_time, next(self._counter), request))

    def prepend(self, requests: list[Request]) -> None:
        for request in requests:
            self.add(request)

    def peek(self) -> Request:
        return self._heap[0][3]

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[3]

    def remove(self, request: Request) -> None:
        self._heap = [entry for entry in self._heap if entry[3] is not request]
        heapq.heapify(self._heap)

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[Request]:
        return (entry[3] for entry in sorted(self._heap, key=lambda entry: entry[:3]))


class Scheduler:
    """schedule() -> the runner executes -> update_from_output(), one step at a time.

    Invariants: a request is in exactly one of `waiting`, `running` or nowhere (finished, then
    also gone from `requests`); `len(running) <= max_num_seqs`; only running requests hold
    blocks; a request preempted in a step was not scheduled in that step.
    """

    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig, num_blocks: int) -> None:
        self.scheduler_config = scheduler_config
        self.cache_config = cache_config
        self.max_num_batched_tokens = scheduler_config.max_num_batched_tokens
        self.max_num_seqs = scheduler_config.max_num_seqs
        self.max_model_len = scheduler_config.max_model_len
        self.policy = scheduler_config.policy
        self.kv_cache_manager = KVCacheManager(
            num_blocks,
            cache_config.block_size,
            cache_config.enable_prefix_caching,
            cache_config.prefix_caching_hash_algo,
        )
        self.requests: dict[str, Request] = {}
        self.waiting: FCFSQueue | PriorityQueue = PriorityQueue() if self.policy == "priority" else FCFSQueue()
        self.running: list[Request] = []
        self.finished_req_ids: set[str] = set()
        """Requests the runner holds that finished or were preempted since the last schedule()."""
        self.num_preemptions = 0
        if num_blocks * cache_config.block_size < self.max_model_len:
            logger.warning(
                "The KV cache holds %d tokens, fewer than max_model_len=%d: a request that long would "
                "preempt itself forever. Lower --max-model-len or give the cache more memory.",
                num_blocks * cache_config.block_size,
                self.max_model_len,
            )

    # ---- requests in and out -------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        assert request.request_id not in self.requests, f"duplicate request id {request.request_id!r}"
        self.requests[request.request_id] = request
        self.kv_cache_manager.update_block_hashes(request)
        self.waiting.add(request)

    def finish_requests(self, req_ids: str | Iterable[str], status: RequestStatus) -> None:
        """End requests in any state (abort, stop string): free their blocks, drop them from queues.

        Unknown or already finished ids are ignored (an abort may race a normal finish).
        """
        assert RequestStatus.is_finished(status), f"{status!r} is not a finished status"
        if isinstance(req_ids, str):
            req_ids = (req_ids,)
        for req_id in req_ids:
            request = self.requests.get(req_id)
            if request is None:
                continue
            was_running = request.status == RequestStatus.RUNNING
            if was_running:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.status = status
            self._free_request(request, notify_runner=was_running)

    def _free_request(self, request: Request, notify_runner: bool = True) -> None:
        """Return a finished request's blocks; if the runner holds it, it is told to drop it next step.

        A waiting or preempted request holds no blocks and is unknown to the runner.
        """
        self.kv_cache_manager.free(request)
        del self.requests[request.request_id]
        if notify_runner:
            self.finished_req_ids.add(request.request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.running) or bool(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def get_request(self, req_id: str) -> Request | None:
        return self.requests.get(req_id)

    # ---- one step ------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Pick this step's requests and token counts under the token budget and the seq cap."""
        token_budget = self.max_num_batched_tokens
        num_scheduled_tokens: dict[str, int] = {}
        new_block_ids: dict[str, list[int]] = {}
        scheduled_running: list[Request] = []
        num_preempted = 0

        # Running requests first, in order: a decode token or the next prefill chunk each.
        req_index = 0
        while req_index < len(self.running) and token_budget > 0:
            request = self.running[req_index]
            num_new_tokens = min(request.num_tokens + request.num_output_placeholders - request.num_started_tokens,
                                 token_budget)
            # async scheduling: the step out may be the last one the length cap allows
            if num_new_tokens <= 0 or self._reaches_length_cap(request, request.num_output_placeholders):
                req_index += 1
                continue
            while True:
                block_ids = self.kv_cache_manager.allocate_slots(request, num_new_tokens)
                if block_ids is not None:
                    break
                victim = self._pick_victim()
                self.running.remove(victim)
                self._preempt(victim)
                num_preempted += 1
                if victim.request_id in num_scheduled_tokens:
                    # Already scheduled earlier in this step (priority policy): take it back.
                    token_budget += num_scheduled_tokens.pop(victim.request_id)
                    del new_block_ids[victim.request_id]
                    scheduled_running.remove(victim)
                    req_index -= 1
                if victim is request:
                    break
            if block_ids is None:
                continue  # the request preempted itself; the list shifted under req_index
            scheduled_running.append(request)
            num_scheduled_tokens[request.request_id] = num_new_tokens
            new_block_ids[request.request_id] = block_ids
            token_budget -= num_new_tokens
            req_index += 1

        cached_reqs = [
            CachedRequestData(r.request_id, new_block_ids[r.request_id], r.num_started_tokens)
            for r in scheduled_running
        ]
        for request in scheduled_running:
            self._start(request, num_scheduled_tokens[request.request_id])

        # Then waiting requests, unless blocks just ran out for a running one.
        scheduled_new: list[Request] = []
        if num_preempted == 0:
            token_budget = self._admit_waiting(token_budget, num_scheduled_tokens, scheduled_new)

        new_reqs = [self._new_request_data(request) for request in scheduled_new]
        for request in scheduled_new:
            self._start(request, num_scheduled_tokens[request.request_id])
        finished_req_ids, self.finished_req_ids = self.finished_req_ids, set()
        return SchedulerOutput(
            scheduled_new_reqs=new_reqs,
            scheduled_cached_reqs=cached_reqs,
            num_scheduled_tokens=num_scheduled_tokens,
            total_num_scheduled_tokens=sum(num_scheduled_tokens.values()),
            finished_req_ids=finished_req_ids,
        )

    def _admit_waiting(self, token_budget: int, num_scheduled_tokens: dict[str, int], scheduled: list[Request]) -> int:
        """Move waiting requests to running while budget, seq cap and blocks last; returns the budget left.

        A request that cannot get its blocks stops admission (head-of-line, keeps the order);
        followers of a prefill leader are skipped, in place, until the leader's prompt is cached.
        """
        skipped: list[Request] = []
        while self.waiting and token_budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting.peek()
            if self._must_wait_for_leader(request):
                skipped.append(self.waiting.pop())
                continue
            hit_blocks, num_hit_tokens = self.kv_cache_manager.get_computed_blocks(request)
            num_new_tokens = min(request.num_tokens - num_hit_tokens, token_budget)
            block_ids = self.kv_cache_manager.allocate_slots(request, num_new_tokens, hit_blocks, num_hit_tokens)
            if block_ids is None:
                break
            self.waiting.pop()
            request.num_computed_tokens = num_hit_tokens
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(request)
            num_scheduled_tokens[request.request_id] = num_new_tokens
            token_budget -= num_new_tokens
        self.waiting.prepend(skipped)
        return token_budget

    @staticmethod
    def _start(request: Request, num_tokens: int) -> None:
        """Count a scheduled step's tokens in flight, and its sampled token, if it reaches the end,
        as a placeholder."""
        if request.num_started_tokens + num_tokens >= request.num_tokens + request.num_output_placeholders:
            request.num_output_placeholders += 1
        request.num_in_flight_tokens += num_tokens

    def _reaches_length_cap(self, request: Request, num_unseen: int = 0) -> bool:
        """Whether the request's tokens, plus `num_unseen` sampled but not yet seen, reach max_tokens
        or max_model_len."""
        max_tokens = request.max_tokens
        return (max_tokens is not None and request.num_output_tokens + num_unseen >= max_tokens) or (
            request.num_tokens + num_unseen >= self.max_model_len)

    def _must_wait_for_leader(self, request: Request) -> bool:
        """n>1 samples wait until their leader's prompt is computed, so that they hit its blocks."""
        if request.prefill_leader_id is None:
            return False
        leader = self.requests.get(request.prefill_leader_id)
        if leader is None:
            return False
        return leader.status != RequestStatus.RUNNING or leader.num_computed_tokens < leader.num_prompt_tokens

    def _pick_victim(self) -> Request:
        if self.policy == "priority":
            return max(self.running, key=lambda r: (r.priority, r.arrival_time))
        return self.running[-1]

    def _preempt(self, request: Request) -> None:
        """Preempt by recompute: drop its KV, keep its tokens, queue it again."""
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_in_flight_tokens = 0  # a step still running for it is dropped when processed
        request.num_output_placeholders = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.prepend([request])
        self.finished_req_ids.add(request.request_id)
        logger.debug("preempted %s (%d tokens)", request.request_id, request.num_tokens)

    def _new_request_data(self, request: Request) -> NewRequestData:
        return NewRequestData(
            req_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=list(request.output_token_ids),
            sampling_params=request.sampling_params,
            block_ids=self.kv_cache_manager.get_block_ids(request),
            num_computed_tokens=request.num_computed_tokens,
            eos_token_id=request.eos_token_id,
        )

    # ---- after the step ------------------------------------------------------------------

    def update_from_output(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> list[EngineCoreOutput]:
        """Advance computed tokens, append sampled ones, apply stop rules, free finished requests.

        Returns an output for every request that got tokens or prompt logprobs or finished.
        Requests aborted while the step ran are skipped (their abort is reported by the caller), as
        are, with async scheduling, those an earlier step stopped or that were preempted since.
        """
        row_of = {req_id: i for i, req_id in enumerate(runner_output.req_ids)}
        outputs: list[EngineCoreOutput] = []
        any_finished = False
        for req_id, num_tokens in scheduler_output.num_scheduled_tokens.items():
            request = self.requests.get(req_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue
            request.num_computed_tokens += num_tokens
            request.num_in_flight_tokens -= num_tokens
            row = row_of.get(req_id)
            sampled = runner_output.sampled_token_ids[row] if row is not None else []
            request.num_output_placeholders -= len(sampled)
            new_token_ids = self._append_and_check_stop(request, sampled)
            self.kv_cache_manager.cache_computed_blocks(request)
            prompt_logprobs = runner_output.prompt_logprobs.get(req_id)
            if request.is_finished:
                any_finished = True
                self._free_request(request)
            if new_token_ids or prompt_logprobs is not None or request.is_finished:
                outputs.append(
                    EngineCoreOutput(
                        req_id=req_id,
                        new_token_ids=new_token_ids,
                        new_logprobs=runner_output.logprobs.get(req_id),
                        new_prompt_logprobs=prompt_logprobs,
                        finish_reason=request.finish_reason,
                        stop_reason=request.stop_reason,
                        num_cached_tokens=max(request.num_cached_tokens, 0),
                    )
                )
        if any_finished:
            self.running = [request for request in self.running if not request.is_finished]
        return outputs

    def _append_and_check_stop(self, request: Request, sampled: list[int]) -> list[int]:
        """Append sampled tokens one by one until a stop rule fires; returns those appended."""
        appended: list[int] = []
        for token_id in sampled:
            request.append_output_token_ids(token_id)
            appended.append(token_id)
            if self._check_stop(request, token_id):
                break
        if appended:
            self.kv_cache_manager.update_block_hashes(request)
        return appended

    def _check_stop(self, request: Request, token_id: int) -> bool:
        """The length cap first (as vLLM), then EOS and stop token ids (both only past min_tokens)."""
        params = request.sampling_params
        if self._reaches_length_cap(request):
            request.status = RequestStatus.FINISHED_LENGTH_CAPPED
            return True
        if request.num_output_tokens < (params.min_tokens or 0):
            return False
        if not params.ignore_eos and token_id == request.eos_token_id:
            request.status = RequestStatus.FINISHED_STOPPED
            return True
        if token_id in (params.stop_token_ids or ()):
            request.status = RequestStatus.FINISHED_STOPPED
            request.stop_reason = token_id
            return True
        return False

    # ---- stats -------------------------------------------------------------------------

    def make_stats(self) -> SchedulerStats:
        prefix_stats = self.kv_cache_manager.prefix_cache_stats
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=self.kv_cache_manager.usage,
            prefix_cache_queries=prefix_stats.queries,
            prefix_cache_hits=prefix_stats.hits,
            num_preemptions=self.num_preemptions,
        )

    def reset_prefix_cache(self) -> None:
        self.kv_cache_manager.reset_prefix_cache()
