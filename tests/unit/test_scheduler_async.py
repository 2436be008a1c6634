"""Asynchronous scheduling in the scheduler: step N+1 is scheduled before step N is processed.

`AsyncSim` runs the engine core's order (schedule and run N+1, then process N) over test_scheduler's
`FakeRunner`, which checks every step against its own copy of the requests and a model of the paged
KV cache. The oracle for what requests produce is the synchronous `Sim` on the same workload.
"""

from __future__ import annotations

import random

import pytest
from test_scheduler import Sim, check_invariants, make_request, make_scheduler

from kiln.core.outputs import EngineCoreOutput, ModelRunnerOutput
from kiln.core.request import RequestStatus
from kiln.core.sched_output import SchedulerOutput


class AsyncSim(Sim):
    """schedule N+1 -> run it -> process N, one step per call."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.runner.lagging = True
        self.in_flight: tuple[SchedulerOutput, ModelRunnerOutput] | None = None
        self.num_model_steps = 0

    def step(self) -> tuple[SchedulerOutput | None, list[EngineCoreOutput]]:
        launched = None
        if self.scheduler.has_unfinished_requests():
            out = self.scheduler.schedule()
            check_invariants(self.scheduler, out)
            launched = (out, self.runner.execute(out))
            self.num_model_steps += not out.is_empty
        outputs: list[EngineCoreOutput] = []
        if self.in_flight is not None:
            outputs = self.scheduler.update_from_output(*self.in_flight)
            for output in outputs:
                assert output.req_id not in self.finals, "no output after a request finished"
                if output.finish_reason is not None:
                    self.finals[output.req_id] = output
        self.in_flight = launched
        return (None if launched is None else launched[0]), outputs

    def run(self, max_steps: int = 200) -> dict[str, EngineCoreOutput]:
        for _ in range(max_steps):
            if not self.scheduler.has_unfinished_requests() and self.in_flight is None:
                return self.finals
            self.step()
        raise AssertionError("requests did not finish")


def _tokens_by_request(sim: Sim, max_steps: int = 500) -> dict[str, tuple[list[int], str | None]]:
    tokens: dict[str, list[int]] = {}
    for _ in range(max_steps):
        if not sim.scheduler.has_unfinished_requests() and getattr(sim, "in_flight", None) is None:
            break
        for output in sim.step()[1]:
            tokens.setdefault(output.req_id, []).extend(output.new_token_ids)
    else:
        raise AssertionError("requests did not finish")
    return {req_id: (tokens.get(req_id, []), final.finish_reason) for req_id, final in sim.finals.items()}


def test_decode_runs_ahead_of_the_tokens_it_feeds_on() -> None:
    """Each decode is scheduled while the step that samples its input is still out: it starts at
    the started (not computed) count, and the sampled token waits as a placeholder."""
    sim = AsyncSim(make_scheduler())
    sim.scheduler.add_request(make_request("r", 5, max_tokens=3))
    request = sim.scheduler.requests["r"]
    out, _ = sim.step()
    assert out.num_scheduled_tokens == {"r": 5}
    assert (request.num_computed_tokens, request.num_in_flight_tokens, request.num_output_placeholders) == (0, 5, 1)
    out, outputs = sim.step()  # schedules the decode of the prefill's token, then processes the prefill
    assert out.num_scheduled_tokens == {"r": 1} and out.scheduled_cached_reqs[0].num_computed_tokens == 5
    assert [o.new_token_ids for o in outputs] == [[1000]]
    assert (request.num_computed_tokens, request.num_in_flight_tokens, request.num_output_placeholders) == (5, 1, 1)


def test_length_cap_schedules_no_step_too_many() -> None:
    """With max_tokens=3 the model runs exactly 3 steps: the fourth would go past the cap."""
    sim = AsyncSim(make_scheduler())
    sim.scheduler.add_request(make_request("r", 5, max_tokens=3))
    assert sim.run()["r"].finish_reason == "length"
    assert sim.num_model_steps == 3
    sim.assert_all_free()


def test_eos_found_late_drops_the_extra_step() -> None:
    """An EOS is seen one step late: that step ran for nothing and its token is never reported."""
    sim = AsyncSim(make_scheduler(), sample=lambda req_id, n: 7 if n == 1 else 1000 + n)
    sim.scheduler.add_request(make_request("r", 5, max_tokens=10, eos=7))
    assert _tokens_by_request(sim) == {"r": ([1000, 7], "stop")}
    assert sim.num_model_steps == 3
    sim.assert_all_free()


def test_abort_and_preemption_with_a_step_out() -> None:
    """A request aborted while its step is out gets no output; one preempted while its step is out
    drops that step's token and recomputes it after resuming."""
    sim = AsyncSim(make_scheduler())
    sim.scheduler.add_request(make_request("a", 5, max_tokens=6))
    sim.scheduler.add_request(make_request("b", 5, max_tokens=6))
    sim.step()
    sim.scheduler.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    _, outputs = sim.step()
    assert [o.req_id for o in outputs] == ["b"]
    sim.run()
    sim.assert_all_free()

    sim = AsyncSim(make_scheduler(num_blocks=6, budget=8))  # 22 tokens fit in 6 blocks alone
    sim.scheduler.add_request(make_request("c", 8, max_tokens=14))
    sim.scheduler.add_request(make_request("d", 8, max_tokens=14))
    preempted = False
    tokens: dict[str, list[int]] = {}
    while sim.scheduler.has_unfinished_requests() or sim.in_flight is not None:
        for output in sim.step()[1]:
            tokens.setdefault(output.req_id, []).extend(output.new_token_ids)
        preempted |= any(r.status == RequestStatus.PREEMPTED for r in sim.scheduler.requests.values())
    assert preempted
    assert tokens == {"c": [1000 + n for n in range(14)], "d": [1000 + n for n in range(14)]}
    sim.assert_all_free()


def _workload(seed: int, policy: str, caching: bool, run_ahead: bool) -> dict[str, tuple[list[int], str | None]]:
    """Random arrivals with shared prefixes on a tiny pool (preemptions), EOS and stop tokens; each
    token depends only on its request and position, so both modes must produce the same."""
    rng = random.Random(seed)
    scheduler = make_scheduler(num_blocks=12, budget=10, max_num_seqs=4, policy=policy, caching=caching)
    sample = lambda req_id, n: (hash(req_id) * 31 + n * 7) % 40  # noqa: E731
    sim = (AsyncSim if run_ahead else Sim)(scheduler, sample=sample)
    shared = [rng.randrange(40) for _ in range(8)]
    for i in range(40):
        prompt = shared[: rng.randrange(9)] + [rng.randrange(40) for _ in range(rng.randrange(1, 10))]
        scheduler.add_request(make_request(
            f"r{i}", prompt, max_tokens=rng.randrange(1, 12), priority=rng.randrange(3), eos=3,
            stop_token_ids=[5], min_tokens=rng.randrange(3),
        ))
    result = _tokens_by_request(sim)
    sim.assert_all_free()
    assert not scheduler.kv_cache_manager.req_to_blocks
    return result


@pytest.mark.parametrize(("policy", "caching"), [("fcfs", True), ("priority", True), ("fcfs", False)])
def test_random_workload_matches_synchronous_scheduling(policy: str, caching: bool) -> None:
    for seed in range(3):
        assert _workload(seed, policy, caching, run_ahead=True) == _workload(seed, policy, caching, run_ahead=False)


def test_random_aborts_keep_invariants_and_return_every_block() -> None:
    rng = random.Random(5)
    scheduler = make_scheduler(num_blocks=12, budget=10, max_num_seqs=4)
    sim = AsyncSim(scheduler, sample=lambda req_id, n: rng.randrange(50))
    for step in range(300):
        if step < 200 and rng.random() < 0.3:
            scheduler.add_request(make_request(f"r{step}", rng.randrange(1, 14), max_tokens=rng.randrange(1, 12), eos=3))
        if scheduler.requests and rng.random() < 0.08:
            scheduler.finish_requests(rng.choice(sorted(scheduler.requests)), RequestStatus.FINISHED_ABORTED)
        sim.step()
    sim.run(max_steps=500)
    sim.assert_all_free()
    assert not scheduler.kv_cache_manager.req_to_blocks
