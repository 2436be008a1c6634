"""Scheduler: token budget, chunked prefill, preemption, priorities, aborts, stop rules (no torch).

Every step goes through `FakeRunner`, which keeps its own copy of each request from the
SchedulerOutput deltas, exactly as the model runner does, and checks it against the scheduler.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from kiln.config import CacheConfig, SchedulerConfig
from kiln.core.outputs import EngineCoreOutput, LogprobsLists, ModelRunnerOutput
from kiln.core.request import Request, RequestStatus
from kiln.core.sched_output import SchedulerOutput
from kiln.core.scheduler import Scheduler

BLOCK_SIZE = 4


@dataclass
class Params:
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    prompt_logprobs: int | None = None


def make_scheduler(
    num_blocks: int = 64,
    budget: int = 64,
    max_num_seqs: int = 16,
    policy: str = "fcfs",
    caching: bool = True,
    hash_algo: str = "builtin",
) -> Scheduler:
    return Scheduler(
        SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_num_seqs, max_model_len=256, policy=policy),
        CacheConfig(block_size=BLOCK_SIZE, enable_prefix_caching=caching, prefix_caching_hash_algo=hash_algo),
        num_blocks,
    )


def make_request(
    req_id: str,
    prompt: list[int] | int,
    max_tokens: int = 4,
    arrival: float | None = None,
    priority: int = 0,
    eos: int | None = None,
    leader: str | None = None,
    **params: object,
) -> Request:
    prompt_ids = prompt if isinstance(prompt, list) else [hash(req_id) % 1000 + i for i in range(prompt)]
    return Request(
        req_id,
        prompt_ids,
        Params(**params),  # type: ignore[arg-type]
        eos,
        arrival_time=arrival,
        priority=priority,
        max_tokens=max_tokens,
        prefill_leader_id=leader,
    )


@dataclass
class _RunnerState:
    token_ids: list[int]
    block_ids: list[int]
    num_computed_tokens: int


class FakeRunner:
    """Applies SchedulerOutput deltas to its own request states, checks them, samples tokens.

    It also models the paged KV cache: each computed position writes the hash of its whole
    prefix into its slot, and every position a request attends to must hold its own prefix's
    value, which catches prefix hits on unwritten or overwritten blocks.
    """

    def __init__(self, scheduler: Scheduler, sample: Callable[[str, int], int] | None = None,
                 lagging: bool = False) -> None:
        self.scheduler = scheduler
        self.sample = sample or (lambda req_id, n: 1000 + n)
        self.states: dict[str, _RunnerState] = {}
        self.kv: dict[tuple[int, int], int] = {}
        self.lagging = lagging
        """Async scheduling: the scheduler has not seen the last step's tokens yet."""

    def _write_and_check_kv(self, out: SchedulerOutput) -> None:
        written: set[tuple[int, int]] = set()
        for req_id, num_tokens in out.num_scheduled_tokens.items():
            state = self.states[req_id]
            for pos in range(state.num_computed_tokens, state.num_computed_tokens + num_tokens):
                slot = (state.block_ids[pos // BLOCK_SIZE], pos % BLOCK_SIZE)
                assert slot not in written, "two requests wrote one KV slot in a step"
                written.add(slot)
                self.kv[slot] = hash(tuple(state.token_ids[: pos + 1]))
        for req_id, num_tokens in out.num_scheduled_tokens.items():
            state = self.states[req_id]
            for pos in range(state.num_computed_tokens + num_tokens):
                slot = (state.block_ids[pos // BLOCK_SIZE], pos % BLOCK_SIZE)
                assert self.kv.get(slot) == hash(tuple(state.token_ids[: pos + 1])), f"stale KV for {req_id}@{pos}"

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        for req_id in out.finished_req_ids:
            self.states.pop(req_id, None)
        for new in out.scheduled_new_reqs:
            assert new.req_id not in self.states, "a new request must not already be held"
            tokens = new.prompt_token_ids + new.output_token_ids
            self.states[new.req_id] = _RunnerState(tokens, list(new.block_ids), new.num_computed_tokens)
        for cached in out.scheduled_cached_reqs:
            state = self.states[cached.req_id]
            assert state.num_computed_tokens == cached.num_computed_tokens
            state.block_ids.extend(cached.new_block_ids)
        self._write_and_check_kv(out)
        req_ids, sampled = [], []
        for req_id, num_tokens in out.num_scheduled_tokens.items():
            state = self.states[req_id]
            request = self.scheduler.requests[req_id]
            if self.lagging:
                assert state.token_ids[:request.num_tokens] == request.all_token_ids
            else:
                assert state.token_ids == request.all_token_ids
            assert state.block_ids == self.scheduler.kv_cache_manager.get_block_ids(request)
            state.num_computed_tokens += num_tokens
            assert state.num_computed_tokens <= len(state.token_ids)
            assert state.num_computed_tokens == request.num_started_tokens
            assert len(state.block_ids) * BLOCK_SIZE >= state.num_computed_tokens
            tokens: list[int] = []
            if state.num_computed_tokens == len(state.token_ids):
                tokens = [self.sample(req_id, len(state.token_ids) - len(request.prompt_token_ids))]
                state.token_ids.extend(tokens)
            req_ids.append(req_id)
            sampled.append(tokens)
        return ModelRunnerOutput(req_ids, sampled)


def check_invariants(scheduler: Scheduler, out: SchedulerOutput) -> None:
    cfg = scheduler.scheduler_config
    assert out.total_num_scheduled_tokens <= cfg.max_num_batched_tokens
    assert out.total_num_scheduled_tokens == sum(out.num_scheduled_tokens.values())
    assert len(scheduler.running) <= cfg.max_num_seqs
    preempted = {r.request_id for r in scheduler.waiting if r.status == RequestStatus.PREEMPTED}
    assert not preempted & set(out.num_scheduled_tokens), "a preempted request was scheduled"
    assert all(r.status == RequestStatus.RUNNING for r in scheduler.running)
    held = sum(len(b) for b in scheduler.kv_cache_manager.req_to_blocks.values())
    assert held >= scheduler.kv_cache_manager.block_pool.num_blocks - scheduler.kv_cache_manager.num_free_blocks


class Sim:
    """schedule -> FakeRunner -> update_from_output, one step per call."""

    def __init__(self, scheduler: Scheduler, sample: Callable[[str, int], int] | None = None) -> None:
        self.scheduler = scheduler
        self.runner = FakeRunner(scheduler, sample)
        self.start_free = scheduler.kv_cache_manager.num_free_blocks
        self.finals: dict[str, EngineCoreOutput] = {}

    def step(self) -> tuple[SchedulerOutput, list[EngineCoreOutput]]:
        out = self.scheduler.schedule()
        check_invariants(self.scheduler, out)
        outputs = self.scheduler.update_from_output(out, self.runner.execute(out))
        for output in outputs:
            assert output.req_id not in self.finals, "no output after a request finished"
            if output.finish_reason is not None:
                self.finals[output.req_id] = output
        return out, outputs

    def run(self, max_steps: int = 200) -> dict[str, EngineCoreOutput]:
        """Step until nothing is left; returns every request's final output so far."""
        for _ in range(max_steps):
            if not self.scheduler.has_unfinished_requests():
                return self.finals
            self.step()
        raise AssertionError("requests did not finish")

    def assert_all_free(self) -> None:
        assert self.scheduler.kv_cache_manager.num_free_blocks == self.start_free


@pytest.fixture
def sims() -> Iterator[list[Sim]]:
    """Collects the test's simulations and checks after the test that every block came back."""
    created: list[Sim] = []
    yield created
    for sim in created:
        sim.assert_all_free()


def new_sim(sims: list[Sim], scheduler: Scheduler, sample: Callable[[str, int], int] | None = None) -> Sim:
    sim = Sim(scheduler, sample)
    sims.append(sim)
    return sim


# ---- budgets and chunking ------------------------------------------------------------------


def test_chunked_prefill_under_tiny_budget(sims: list[Sim]) -> None:
    """Budget 5, prompt 12: chunks 5, 5, 2; only the last chunk samples; later chunks travel as
    deltas carrying num_computed_tokens before the step."""
    sim = new_sim(sims, make_scheduler(budget=5))
    sim.scheduler.add_request(make_request("a", 12, max_tokens=2))
    chunks = []
    for _ in range(3):
        out, outputs = sim.step()
        chunks.append(out.num_scheduled_tokens["a"])
        if len(chunks) < 3:
            assert outputs == []
    assert chunks == [5, 5, 2]
    assert [o.new_token_ids for o in outputs] == [[1000]]
    out, outputs = sim.step()
    assert out.scheduled_cached_reqs[0].num_computed_tokens == 12
    assert outputs[0].finish_reason == "length" and outputs[0].new_token_ids == [1001]
    assert sim.scheduler.schedule().finished_req_ids == {"a"}


def test_decode_and_new_prefill_share_a_step(sims: list[Sim]) -> None:
    """A running decode is served first, then a new prefill is chunked into what is left."""
    sim = new_sim(sims, make_scheduler(budget=6))
    sim.scheduler.add_request(make_request("a", 4, max_tokens=5))
    sim.step()
    sim.scheduler.add_request(make_request("b", 9, max_tokens=1))
    out, _ = sim.step()
    assert out.num_scheduled_tokens == {"a": 1, "b": 5}
    assert [r.req_id for r in out.scheduled_cached_reqs] == ["a"]
    assert [r.req_id for r in out.scheduled_new_reqs] == ["b"]
    out, _ = sim.step()
    assert out.num_scheduled_tokens == {"a": 1, "b": 4}
    sim.run()


def test_max_num_seqs_caps_running(sims: list[Sim]) -> None:
    """No more than max_num_seqs requests run at once; the rest wait their turn in order."""
    sim = new_sim(sims, make_scheduler(max_num_seqs=2))
    for i in range(4):
        sim.scheduler.add_request(make_request(f"r{i}", 3, max_tokens=2))
    out, _ = sim.step()
    assert list(out.num_scheduled_tokens) == ["r0", "r1"]
    assert sim.scheduler.num_running == 2 and sim.scheduler.num_waiting == 2
    finals = sim.run()
    assert set(finals) == {"r0", "r1", "r2", "r3"}


# ---- preemption ----------------------------------------------------------------------------


def test_fcfs_preempts_last_running_and_resumes_with_its_outputs(sims: list[Sim]) -> None:
    """Out of blocks, fcfs preempts the last running request; it goes to the front of the queue,
    is reported in finished_req_ids, and later resumes as a new request carrying its outputs."""
    sim = new_sim(sims, make_scheduler(num_blocks=4))
    sim.scheduler.add_request(make_request("a", 4, max_tokens=6))
    sim.scheduler.add_request(make_request("b", 4, max_tokens=6))
    sim.scheduler.add_request(make_request("c", 4, max_tokens=1))
    out, _ = sim.step()  # a and b prefill (1 block each), c too
    assert set(out.num_scheduled_tokens) == {"a", "b", "c"}
    out, _ = sim.step()  # c finished; a and b need their 2nd blocks
    assert set(out.num_scheduled_tokens) == {"a", "b"}
    for _ in range(3):  # a, b fill their second blocks (8 tokens)
        out, _ = sim.step()
    assert sim.scheduler.num_preemptions == 0
    out, _ = sim.step()  # both need a 3rd block, only 0 free -> b (last) is preempted
    b = sim.scheduler.requests["b"]
    assert b.status == RequestStatus.PREEMPTED and b.num_preemptions == 1
    assert "b" in out.finished_req_ids and "b" not in out.num_scheduled_tokens
    assert out.num_scheduled_tokens == {"a": 1}
    outputs_before = list(b.output_token_ids)
    assert len(outputs_before) == 5
    resumed = None
    for _ in range(20):
        out, _ = sim.step()
        resumed = next((r for r in out.scheduled_new_reqs if r.req_id == "b"), None)
        if resumed is not None:
            break
    assert resumed is not None and resumed.output_token_ids == outputs_before
    finals = sim.run()
    assert finals["b"].finish_reason == "length"
    assert sim.scheduler.make_stats().num_preemptions == 1


def test_priority_preempts_lowest_priority_and_unschedules_it(sims: list[Sim]) -> None:
    """Under policy priority the victim is the running request with the largest (priority,
    arrival); when it was already scheduled this step its tokens go back to the budget and it
    leaves the step's outputs."""
    sim = new_sim(sims, make_scheduler(num_blocks=2, policy="priority"))
    sim.scheduler.add_request(make_request("low", 3, max_tokens=3, priority=5, arrival=0.0))
    sim.step()  # low prefilled (1 block), 4 tokens now
    sim.scheduler.add_request(make_request("high", 4, max_tokens=3, priority=0, arrival=1.0))
    out, _ = sim.step()  # low decodes, high prefills: 1 block each, none free
    assert out.num_scheduled_tokens == {"low": 1, "high": 4}
    out, _ = sim.step()  # low fits in its block and is scheduled first; high needs a 2nd block
    assert out.num_scheduled_tokens == {"high": 1}
    assert out.scheduled_new_reqs == [] and [r.req_id for r in out.scheduled_cached_reqs] == ["high"]
    assert "low" in out.finished_req_ids
    assert sim.scheduler.requests["low"].status == RequestStatus.PREEMPTED
    finals = sim.run()
    assert set(finals) == {"low", "high"}


def test_request_preempting_itself_stops_its_scheduling(sims: list[Sim]) -> None:
    """When the only victim left is the request itself, it is preempted and not scheduled."""
    sim = new_sim(sims, make_scheduler(num_blocks=3))
    sim.scheduler.add_request(make_request("a", 4, max_tokens=8))
    sim.scheduler.add_request(make_request("b", 8, max_tokens=2))
    sim.step()  # a: 1 block, b: 2 blocks
    out, _ = sim.step()  # a needs a 2nd block; fcfs victim is b (last); a then runs
    assert out.num_scheduled_tokens == {"a": 1}
    assert sim.scheduler.requests["b"].status == RequestStatus.PREEMPTED
    sim.run()


# ---- queue order and n>1 -------------------------------------------------------------------


def test_priority_orders_waiting_requests(sims: list[Sim]) -> None:
    """Policy priority admits waiting requests by (priority, arrival_time), lower first."""
    sim = new_sim(sims, make_scheduler(max_num_seqs=1, policy="priority"))
    specs = [("p3", 3, 0.0), ("p1_late", 1, 2.0), ("p1_early", 1, 1.0), ("p0", 0, 3.0)]
    for req_id, priority, arrival in specs:
        sim.scheduler.add_request(make_request(req_id, 3, max_tokens=1, priority=priority, arrival=arrival))
    order = []
    while sim.scheduler.has_unfinished_requests():
        out, _ = sim.step()
        order += [r.req_id for r in out.scheduled_new_reqs]
    assert order == ["p0", "p1_early", "p1_late", "p3"]


def test_fcfs_head_of_line_blocks_when_allocation_fails(sims: list[Sim]) -> None:
    """fcfs keeps order: a waiting request that cannot get blocks stops admission of later ones."""
    sim = new_sim(sims, make_scheduler(num_blocks=3, budget=64))
    sim.scheduler.add_request(make_request("a", 8, max_tokens=2))
    sim.scheduler.add_request(make_request("big", 8, max_tokens=1))
    sim.scheduler.add_request(make_request("small", 2, max_tokens=1))
    out, _ = sim.step()
    assert list(out.num_scheduled_tokens) == ["a"]
    assert [r.request_id for r in sim.scheduler.waiting] == ["big", "small"]
    sim.run()


def test_followers_wait_for_leader_prefill_then_hit_its_blocks(sims: list[Sim]) -> None:
    """n>1 followers are skipped (keeping their place, not blocking others) until the leader's
    prompt is computed, then admitted with prefix hits on the leader's prompt blocks."""
    sim = new_sim(sims, make_scheduler(budget=8))
    prompt = list(range(12))
    sim.scheduler.add_request(make_request("lead", list(prompt), max_tokens=2))
    sim.scheduler.add_request(make_request("f1", list(prompt), max_tokens=2, leader="lead"))
    sim.scheduler.add_request(make_request("other", 3, max_tokens=1))
    out, _ = sim.step()  # lead's first chunk (8); f1 skipped; nothing left for other
    assert out.num_scheduled_tokens == {"lead": 8}
    out, _ = sim.step()  # lead's last chunk (4); f1 still skipped; other admitted behind it
    assert out.num_scheduled_tokens == {"lead": 4, "other": 3}
    assert [r.request_id for r in sim.scheduler.waiting] == ["f1"]
    lead_block_ids = sim.scheduler.kv_cache_manager.get_block_ids(sim.scheduler.requests["lead"])
    out, _ = sim.step()
    (f1,) = [r for r in out.scheduled_new_reqs if r.req_id == "f1"]
    assert f1.num_computed_tokens == 8 and out.num_scheduled_tokens["f1"] == 4
    assert f1.block_ids[:2] == lead_block_ids[:2]
    finals = sim.run()
    assert finals["f1"].num_cached_tokens == 8 and finals["lead"].num_cached_tokens == 0
    stats = sim.scheduler.make_stats()
    assert stats.prefix_cache_hits == 8 and stats.prefix_cache_queries > 0


def test_follower_of_gone_leader_is_admitted(sims: list[Sim]) -> None:
    """A follower whose leader was aborted is admitted normally."""
    sim = new_sim(sims, make_scheduler())
    sim.scheduler.add_request(make_request("lead", 6))
    sim.scheduler.add_request(make_request("f1", 6, leader="lead"))
    sim.scheduler.finish_requests("lead", RequestStatus.FINISHED_ABORTED)
    out, _ = sim.step()
    assert list(out.num_scheduled_tokens) == ["f1"]
    sim.run()


def test_prefix_cache_covers_generated_tokens(sims: list[Sim]) -> None:
    """A follow-up prompt that repeats an earlier prompt and its outputs hits the blocks the
    outputs filled (multi-turn reuse)."""
    sim = new_sim(sims, make_scheduler(hash_algo="sha256"))
    first = make_request("a", list(range(6)), max_tokens=5)
    sim.scheduler.add_request(first)
    sim.run()
    history = first.all_token_ids  # 11 tokens, 10 computed: blocks 0 and 1 cached
    sim.scheduler.add_request(make_request("b", history + [7, 7, 7]))
    out, _ = sim.step()
    assert out.scheduled_new_reqs[0].num_computed_tokens == 8
    sim.run()


# ---- finishing -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "tokens", "reason", "stop_reason", "num_out"),
    [
        ({"eos": 7}, [5, 7, 9], "stop", None, 2),
        ({"eos": 7, "min_tokens": 3}, [7, 7, 7, 5], "stop", None, 3),
        ({"eos": 7, "ignore_eos": True}, [7, 7, 7, 7, 7, 7], "length", None, 4),
        ({"stop_token_ids": [8, 9]}, [5, 9, 1], "stop", 9, 2),
        ({"stop_token_ids": [9], "min_tokens": 2}, [9, 9], "stop", 9, 2),
        ({}, [1, 2, 3, 4, 5], "length", None, 4),
        ({"eos": 7}, [1, 2, 3, 7], "length", None, 4),
    ],
)
def test_finish_rules(
    sims: list[Sim], kwargs: dict, tokens: list[int], reason: str, stop_reason: int | None, num_out: int
) -> None:
    """max_tokens first (as vLLM: an EOS on the last allowed token is 'length'), then EOS
    (unless ignore_eos) and stop_token_ids, both only from min_tokens on; blocks are freed at finish."""
    sim = new_sim(sims, make_scheduler(), sample=lambda req_id, n: tokens[n])
    sim.scheduler.add_request(make_request("r", 5, max_tokens=4, **kwargs))
    outputs = []
    while sim.scheduler.has_unfinished_requests():
        outputs += sim.step()[1]
    final = outputs[-1]
    assert (final.finish_reason, final.stop_reason) == (reason, stop_reason)
    assert sum(len(o.new_token_ids) for o in outputs) == num_out
    assert all(o.finish_reason is None for o in outputs[:-1])


def test_logprobs_are_forwarded(sims: list[Sim]) -> None:
    """Logprobs and prompt logprobs from the runner reach the request's EngineCoreOutput, even
    for a non-final prefill chunk that sampled nothing."""
    scheduler = make_scheduler(budget=4)
    sim = new_sim(sims, scheduler)
    scheduler.add_request(make_request("r", 6, max_tokens=1, prompt_logprobs=0))
    rows = LogprobsLists([[1]], [[-0.5]], [1])
    out = scheduler.schedule()
    runner_out = sim.runner.execute(out)
    runner_out.prompt_logprobs["r"] = rows
    (output,) = scheduler.update_from_output(out, runner_out)
    assert output.new_token_ids == [] and output.new_prompt_logprobs is rows
    out = scheduler.schedule()
    runner_out = sim.runner.execute(out)
    runner_out.logprobs["r"] = rows
    (output,) = scheduler.update_from_output(out, runner_out)
    assert output.new_logprobs is rows and output.finish_reason == "length"


# ---- aborts --------------------------------------------------------------------------------


def test_abort_at_every_stage_returns_blocks(sims: list[Sim]) -> None:
    """Aborting a waiting, mid-prefill, decoding or preempted request frees its blocks and
    removes it; the runner is told to drop only the ones it held."""
    sim = new_sim(sims, make_scheduler(num_blocks=6, budget=6))
    scheduler = sim.scheduler
    scheduler.add_request(make_request("decode", 4, max_tokens=20))
    scheduler.add_request(make_request("prefill", 12, max_tokens=20))
    scheduler.add_request(make_request("waiting", 4, max_tokens=20))
    sim.step()
    sim.step()
    assert scheduler.requests["prefill"].num_computed_tokens < 12
    assert scheduler.requests["decode"].num_output_tokens > 0
    scheduler.finish_requests(["prefill", "waiting"], RequestStatus.FINISHED_ABORTED)
    scheduler.finish_requests("decode", RequestStatus.FINISHED_ABORTED)
    scheduler.finish_requests("unknown", RequestStatus.FINISHED_ABORTED)
    assert not scheduler.has_unfinished_requests()
    assert scheduler.schedule().finished_req_ids == {"prefill", "decode"}
    sim.assert_all_free()

    scheduler.add_request(make_request("a", 8, max_tokens=14))  # 22 tokens fit in 6 blocks alone
    scheduler.add_request(make_request("b", 8, max_tokens=14))
    while not any(r.status == RequestStatus.PREEMPTED for r in scheduler.requests.values()):
        sim.step()
    (victim,) = [r for r in scheduler.requests.values() if r.status == RequestStatus.PREEMPTED]
    scheduler.finish_requests(victim.request_id, RequestStatus.FINISHED_ABORTED)
    assert victim.status == RequestStatus.FINISHED_ABORTED and victim.finish_reason == "abort"
    sim.run()


def test_abort_while_step_in_flight(sims: list[Sim]) -> None:
    """A request aborted between schedule() and update_from_output() gets no output and its
    blocks stay freed."""
    sim = new_sim(sims, make_scheduler())
    sim.scheduler.add_request(make_request("a", 5))
    sim.scheduler.add_request(make_request("b", 5))
    out = sim.scheduler.schedule()
    runner_out = sim.runner.execute(out)
    sim.scheduler.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    outputs = sim.scheduler.update_from_output(out, runner_out)
    assert [o.req_id for o in outputs] == ["b"]
    sim.run()


def test_stop_string_finish_from_the_engine(sims: list[Sim]) -> None:
    """finish_requests with FINISHED_STOPPED (a stop string found by the detokenizer) ends a
    running request like an abort."""
    sim = new_sim(sims, make_scheduler())
    sim.scheduler.add_request(make_request("a", 5, max_tokens=10))
    sim.step()
    sim.scheduler.finish_requests("a", RequestStatus.FINISHED_STOPPED)
    assert sim.scheduler.schedule().finished_req_ids == {"a"}


# ---- whole-system properties ---------------------------------------------------------------


def _random_workload(seed: int, policy: str, caching: bool) -> list[tuple[int, ...]]:
    """Random arrivals, shared prefixes and aborts on a tiny pool; returns the schedule trace."""
    rng = random.Random(seed)
    scheduler = make_scheduler(num_blocks=12, budget=10, max_num_seqs=4, policy=policy, caching=caching)
    sim = Sim(scheduler, sample=lambda req_id, n: rng.randrange(50))
    trace: list[tuple[int, ...]] = []
    shared = [rng.randrange(50) for _ in range(8)]
    for step in range(300):
        if step < 200 and rng.random() < 0.3:
            prompt = shared[: rng.randrange(9)] + [rng.randrange(50) for _ in range(rng.randrange(1, 10))]
            scheduler.add_request(
                make_request(f"r{step}", prompt, max_tokens=rng.randrange(1, 12), priority=rng.randrange(3), eos=3)
            )
        if scheduler.requests and rng.random() < 0.05:
            scheduler.finish_requests(rng.choice(sorted(scheduler.requests)), RequestStatus.FINISHED_ABORTED)
        out, _ = sim.step()
        trace.append(tuple(out.num_scheduled_tokens.values()))
    sim.run(max_steps=500)
    sim.assert_all_free()
    assert not scheduler.kv_cache_manager.req_to_blocks
    return trace


@pytest.mark.parametrize(("policy", "caching"), [("fcfs", True), ("priority", True), ("fcfs", False)])
def test_random_workload_keeps_invariants_and_is_deterministic(policy: str, caching: bool) -> None:
    """Under random load with preemptions and aborts, every step respects the budgets and the
    runner's view, all blocks come back, and the same inputs give the same schedule."""
    assert _random_workload(1, policy, caching) == _random_workload(1, policy, caching)
