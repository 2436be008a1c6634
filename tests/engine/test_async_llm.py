"""The asyncio front: concurrent streams, validation before queueing, cancellation (a client
disconnect) aborting the request and returning its blocks, shutdown answering everyone."""

from __future__ import annotations

import asyncio
import time

import pytest

from kiln import SamplingParams
from kiln.config import EngineArgs
from kiln.engine.async_llm import AsyncLLM
from kiln.errors import EngineDeadError, InvalidRequestError

pytestmark = pytest.mark.slow


@pytest.fixture
def engine(cached_weights):
    args = EngineArgs(dtype="float32", max_model_len=512, kv_cache_memory=0.1, disable_log_stats=True)
    engine = AsyncLLM.from_engine_args(args)
    yield engine
    engine.shutdown()


async def _collect(engine, prompt, params, request_id):
    outputs = [out async for out in engine.generate(prompt, params, request_id)]
    return outputs


def test_streams_cancellation_and_validation(engine):
    free_at_start = engine.engine.core.scheduler.kv_cache_manager.num_free_blocks
    greedy = SamplingParams(temperature=0, max_tokens=12)
    offline = engine.engine  # the same engine driven synchronously gives the oracle

    async def main():
        async def long_stream():
            async for _ in engine.generate("Tell me a long story", SamplingParams(max_tokens=400, ignore_eos=True),
                                           "long"):
                pass

        long_task = asyncio.create_task(long_stream())
        streams = await asyncio.gather(*[_collect(engine, f"Count to {i}:", greedy, f"r{i}") for i in range(3)])
        long_task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await long_task
        with pytest.raises(InvalidRequestError, match="exceeds the context length 512"):
            await _collect(engine, "x", SamplingParams(max_tokens=1000), "too-long")
        return streams

    streams = asyncio.run(main())
    for outputs in streams:
        texts = [o.outputs[0].text for o in outputs]
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:])), "cumulative text only extends"
        assert outputs[-1].finished and not any(o.finished for o in outputs[:-1])
    engine.shutdown()
    assert not offline.has_unfinished_requests()
    assert offline.core.scheduler.kv_cache_manager.num_free_blocks == free_at_start
    for i, outputs in enumerate(streams):
        offline.add_request(f"check{i}", f"Count to {i}:", greedy)
    results = {}
    while offline.has_unfinished_requests():
        results.update({o.request_id: o for o in offline.step() if o.finished})
    for i, outputs in enumerate(streams):
        assert outputs[-1].outputs[0].token_ids == results[f"check{i}"].outputs[0].token_ids


def test_shutdown_answers_requests_in_flight(engine):
    async def main():
        task = asyncio.create_task(_collect(engine, "Go on forever", SamplingParams(max_tokens=400, ignore_eos=True),
                                            "forever"))
        await asyncio.sleep(0.5)
        await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)
        with pytest.raises(EngineDeadError):
            await task
        with pytest.raises(EngineDeadError):
            await _collect(engine, "late", SamplingParams(max_tokens=2), "late")

    asyncio.run(main())
    assert not engine.engine.has_unfinished_requests()


def test_idle_engine_faults_in_its_kv_cache_and_still_serves(engine):
    """Between requests the engine thread faults its CPU KV cache in, and a request arriving
    meanwhile is served as usual."""
    memory = engine.engine.core.worker.kv_memory

    async def one():
        return await _collect(engine, "Hello", SamplingParams(temperature=0, max_tokens=4), "during")

    outputs = asyncio.run(one())
    assert outputs[-1].finished and len(outputs[-1].outputs[0].token_ids) == 4
    deadline = time.monotonic() + 60
    while not memory.fully_prefaulted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert memory.fully_prefaulted
