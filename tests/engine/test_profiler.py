"""KILN_TORCH_PROFILER_DIR: start/stop around engine steps writes a torch trace of those steps, both
offline and through the async front (where the profiler must run where the steps run: on the engine
thread, or in the engine core process); without the variable, starting is a clear error."""

from __future__ import annotations

import asyncio
import glob
import json

import pytest

from kiln import SamplingParams
from kiln.config import EngineArgs
from kiln.engine.async_llm import AsyncLLM
from kiln.errors import EngineDeadError, InvalidRequestError

pytestmark = pytest.mark.slow
PARAMS = SamplingParams(temperature=0, max_tokens=3)


def _op_names(trace_dir) -> set[str]:
    files = glob.glob(f"{trace_dir}/*.pt.trace.json")
    assert len(files) == 1, files
    with open(files[0]) as f:
        return {event.get("name", "") for event in json.load(f)["traceEvents"]}


def test_profiling_needs_the_directory(make_llm, monkeypatch):
    monkeypatch.delenv("KILN_TORCH_PROFILER_DIR", raising=False)
    llm = make_llm(dtype="float32")
    with pytest.raises(InvalidRequestError, match="KILN_TORCH_PROFILER_DIR"):
        llm.start_profile()


def test_offline_profile_traces_the_model_ops(make_llm, monkeypatch, tmp_path):
    monkeypatch.setenv("KILN_TORCH_PROFILER_DIR", str(tmp_path))
    llm = make_llm(dtype="float32")
    llm.start_profile()
    with pytest.raises(InvalidRequestError, match="already running"):
        llm.start_profile()
    llm.generate(["Hello"], PARAMS, use_tqdm=False)
    llm.stop_profile()
    names = _op_names(tmp_path)
    assert "aten::linear" in names or "aten::mm" in names
    with pytest.raises(InvalidRequestError, match="not running"):
        llm.stop_profile()


@pytest.mark.parametrize("core_process", [False, True], ids=["engine-thread", "core-process"])
def test_async_profile_runs_where_the_steps_run(cached_weights, monkeypatch, tmp_path, core_process):
    monkeypatch.setenv("KILN_TORCH_PROFILER_DIR", str(tmp_path))
    engine = AsyncLLM.from_engine_args(EngineArgs(dtype="float32", max_model_len=512, kv_cache_memory=0.1,
                                                  disable_log_stats=True), core_process=core_process)

    async def main():
        await engine.start_profile()
        outputs = [out async for out in engine.generate("Hello", PARAMS, "r1")]
        await engine.stop_profile()
        with pytest.raises(InvalidRequestError):
            await engine.stop_profile()
        return outputs

    try:
        outputs = asyncio.run(main())
    finally:
        engine.shutdown()
    assert outputs[-1].finished
    with pytest.raises(EngineDeadError):  # no engine thread left to answer: fail, do not hang
        asyncio.run(engine.start_profile())
    assert "aten::linear" in _op_names(tmp_path) or "aten::mm" in _op_names(tmp_path)
