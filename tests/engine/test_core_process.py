"""The engine core in its own process (the server's default): the same tokens as the in-process
engine, aborts and stop strings that reach the core and return its KV blocks, constraints and
reasoning parsers that cross the pipe, a request that cannot cross it failing alone, a killed core
failing its requests (busy or idle), and shutdown ending the process."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import types

import pytest

from kiln import SamplingParams
from kiln.config import EngineArgs
from kiln.engine.async_llm import AsyncLLM
from kiln.errors import EngineDeadError, InvalidRequestError
from kiln.structured.params import StructuredOutputsParams

pytestmark = pytest.mark.slow

ARGS = dict(dtype="float32", max_model_len=512, kv_cache_memory=0.1, disable_log_stats=True)
PROMPTS = ["Count to 3:", "The capital of France is", "Write a haiku about rain"]


@pytest.fixture(scope="module")
def engine():
    """One engine for the module; shutting it down must end its core process cleanly."""
    engine = AsyncLLM.from_engine_args(EngineArgs(**ARGS), core_process=True)
    process = _core_process(engine)
    yield engine
    engine.shutdown()
    assert not process.is_alive() and process.exitcode == 0


def _core_process(engine: AsyncLLM):
    return engine.engine.core._process


async def _final(engine: AsyncLLM, prompt, params: SamplingParams, request_id: str):
    final = None
    async for output in engine.generate(prompt, params, request_id):
        final = output
    return final


def _wait_until_idle(engine: AsyncLLM) -> None:
    """Until the core has acknowledged every abort and reports no request holding KV blocks."""
    core = engine.engine.core
    deadline = time.monotonic() + 30
    while core.has_unfinished_requests() or core.make_scheduler_stats().kv_cache_usage > 0:
        assert time.monotonic() < deadline, core.make_scheduler_stats()
        time.sleep(0.05)
    assert core.make_scheduler_stats().num_running == core.make_scheduler_stats().num_waiting == 0


def test_greedy_tokens_match_the_in_process_engine(engine, make_llm):
    greedy = SamplingParams(temperature=0, max_tokens=16)

    async def main():
        return await asyncio.gather(*[_final(engine, p, greedy, f"g{i}") for i, p in enumerate(PROMPTS)])

    served = asyncio.run(main())
    offline = make_llm(**ARGS).generate(PROMPTS, greedy, use_tqdm=False)
    for got, want in zip(served, offline):
        assert got.finished
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        assert got.outputs[0].text == want.outputs[0].text
    assert os.getpid() != _core_process(engine).pid


def test_cancel_and_stop_string_return_the_blocks(engine):
    async def main():
        async def forever():
            async for _ in engine.generate("Go on and on", SamplingParams(max_tokens=400, ignore_eos=True), "long"):
                pass

        task = asyncio.create_task(forever())
        await asyncio.sleep(1.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        stopped = await _final(engine, "Count to 3:", SamplingParams(temperature=0, max_tokens=64, stop=["3"]),
                               "stop")
        full = await _final(engine, "Count to 3:", SamplingParams(temperature=0, max_tokens=64), "full")
        return stopped, full

    stopped, full = asyncio.run(main())
    sample = stopped.outputs[0]
    assert sample.finish_reason == "stop" and sample.stop_reason == "3"
    assert full.outputs[0].text.startswith(sample.text + "3")  # the stop string cut the same text
    _wait_until_idle(engine)


def test_constraints_and_reasoning_parsers_cross_the_pipe(engine):
    from kiln.parsers.reasoning import ReasoningParserManager

    choice = SamplingParams(temperature=0, max_tokens=8,
                            structured_outputs=StructuredOutputsParams(choice=["alpha", "beta"]))
    gated = SamplingParams(temperature=0, max_tokens=12, structured_outputs=StructuredOutputsParams(regex="[0-9]+"))
    gate = ReasoningParserManager.get("deepseek_r1")(engine.tokenizer)
    gate.set_prompt("Think first. <think>")
    gated.reasoning_gate = gate  # the tokenizer it holds travels by reference

    async def main():
        return await asyncio.gather(_final(engine, "Pick one:", choice, "choice"),
                                    _final(engine, "A number:", gated, "gated"))

    picked, thought = asyncio.run(main())
    assert picked.outputs[0].text in ("alpha", "beta")
    assert picked.outputs[0].finish_reason == "stop"
    assert thought.finished and thought.outputs[0].token_ids
    _wait_until_idle(engine)


class _Unpicklable:
    def __init__(self) -> None:
        self.callback = lambda: None


def test_a_request_that_cannot_cross_fails_alone(engine, monkeypatch):
    """Its params hold an object of a class the core process cannot import (as a plugin's would
    be), or one that does not pickle at all: that request ends with finish_reason "abort"; the
    engine keeps serving."""
    plugin = types.ModuleType("kiln_frontend_only_plugin")
    exec("class Gate:\n    pass\n", plugin.__dict__)
    monkeypatch.setitem(sys.modules, plugin.__name__, plugin)
    foreign = SamplingParams(max_tokens=4)
    foreign.reasoning_gate = plugin.Gate()
    unpicklable = SamplingParams(max_tokens=4)
    unpicklable.reasoning_gate = _Unpicklable()

    async def main():
        return await asyncio.gather(_final(engine, "Hello", foreign, "foreign"),
                                    _final(engine, "Hello", unpicklable, "unpicklable"),
                                    _final(engine, "Hello", SamplingParams(temperature=0, max_tokens=4), "fine"))

    foreign_out, unpicklable_out, fine = asyncio.run(main())
    assert foreign_out.outputs[0].finish_reason == "abort" and not foreign_out.outputs[0].token_ids
    assert unpicklable_out.outputs[0].finish_reason == "abort"
    assert len(fine.outputs[0].token_ids) == 4 and not engine.is_dead
    _wait_until_idle(engine)


def test_a_build_error_reaches_the_caller_as_itself():
    """An InvalidRequestError raised while the core process builds the engine (here: a KV cache too
    small for max_model_len) is raised by AsyncLLM's constructor, so `kiln serve` prints one line."""
    with pytest.raises(InvalidRequestError, match="fewer than max_model_len"):
        AsyncLLM.from_engine_args(EngineArgs(**{**ARGS, "kv_cache_memory": 0.0001}), core_process=True)


@pytest.mark.parametrize("busy", [True, False], ids=["mid-request", "idle"])
def test_a_killed_core_kills_the_engine(busy):
    """Killed mid-request, the request fails; killed while idle, the engine notices within its idle
    wait (so /health turns 503 before any request finds out); later requests fail at once."""
    engine = AsyncLLM.from_engine_args(EngineArgs(**ARGS), core_process=True)
    try:
        async def main():
            params = SamplingParams(max_tokens=400 if busy else 4, ignore_eos=True)
            task = asyncio.create_task(_final(engine, "Go on", params, "r"))
            if not busy:
                await task
            await asyncio.sleep(1.0)
            os.kill(_core_process(engine).pid, signal.SIGKILL)
            if busy:
                with pytest.raises(EngineDeadError, match="exit code -9"):
                    await task
            deadline = time.monotonic() + 10
            while not engine.is_dead:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
            with pytest.raises(EngineDeadError):
                await _final(engine, "late", SamplingParams(max_tokens=2), "late")

        asyncio.run(main())
    finally:
        engine.shutdown()
