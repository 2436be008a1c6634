"""Asynchronous scheduling on the embedded model: the same outputs as synchronous scheduling for
every sampling feature (the oracle is the synchronous engine on the same requests), with decode
steps really launched before the previous step was read back."""

from __future__ import annotations

import asyncio

import pytest
from test_core_process import _final, _wait_until_idle

from kiln import SamplingParams
from kiln.config import EngineArgs
from kiln.engine.async_llm import AsyncLLM
from kiln.structured.params import StructuredOutputsParams

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "Write a poem about the sea:", "1, 2, 3, 4,", "def fib(n):",
           "List three colors:", "Once upon a time"]


def _mixed_params() -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0, max_tokens=24),
        SamplingParams(temperature=0.8, seed=7, max_tokens=20, logprobs=2),
        SamplingParams(temperature=0, max_tokens=20, repetition_penalty=1.3, frequency_penalty=0.5),
        SamplingParams(temperature=0.7, seed=3, max_tokens=16, min_tokens=10, bad_words=[" the"]),
        SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[13], prompt_logprobs=1),
        SamplingParams(temperature=1.0, seed=5, max_tokens=12, n=2,
                       structured_outputs=StructuredOutputsParams(choice=["red, green, blue", "cyan"])),
    ]


def _summary(outputs) -> list:
    return [(o.prompt_logprobs, [(c.token_ids, c.logprobs, c.finish_reason, c.stop_reason) for c in o.outputs])
            for o in outputs]


@pytest.mark.parametrize("engine_kwargs", [
    {"max_model_len": 256},
    # chunked prefills and preemptions: 8 blocks of 16 tokens for 7 sequences of up to ~40 tokens
    {"max_model_len": 128, "max_num_batched_tokens": 16, "num_gpu_blocks_override": 8, "max_num_seqs": 8},
])
def test_outputs_match_synchronous_scheduling(make_llm, engine_kwargs):
    kwargs = dict(engine_kwargs)
    expected = _summary(make_llm(**kwargs).generate(PROMPTS, _mixed_params(), use_tqdm=False))
    llm = make_llm(async_scheduling=True, **kwargs)
    assert _summary(llm.generate(PROMPTS, _mixed_params(), use_tqdm=False)) == expected
    if "num_gpu_blocks_override" in engine_kwargs:
        assert llm.llm_engine.core.scheduler.num_preemptions > 0


def test_penalties_read_the_pending_token(make_llm):
    """Without a row that waits, every decode step samples while the previous step's tokens are
    still on the device: penalties must count them all the same (min_tokens' count of them is
    checked exactly in tests/unit/test_sampler.py)."""
    params = [SamplingParams(temperature=0, max_tokens=24, repetition_penalty=1.8, frequency_penalty=1.5),
              SamplingParams(temperature=0.9, seed=11, max_tokens=16, presence_penalty=2.0, min_tokens=12),
              SamplingParams(temperature=0, max_tokens=20, frequency_penalty=-1.0, bad_words=["the"])]
    expected = _summary(make_llm(max_model_len=256).generate(PROMPTS[:3], params, use_tqdm=False))
    llm = make_llm(max_model_len=256, async_scheduling=True)
    assert _summary(llm.generate(PROMPTS[:3], params, use_tqdm=False)) == expected


def test_decode_steps_launch_before_the_last_step_is_read(make_llm):
    """Plain, penalized and min_tokens rows never wait for the previous step; a row with a bad word
    of several tokens reads it back, after its step's forward was queued."""
    llm = make_llm(max_model_len=256, async_scheduling=True)
    runner = llm.llm_engine.core.worker.model_runner
    launch = runner.launch
    seen: list[tuple[bool, bool]] = []  # per launch: (previous step unread at entry, ... still unread after)

    def spy(sched):
        previous = runner.last_step
        unread_before = previous is not None and not previous.done
        step = launch(sched)
        seen.append((unread_before, unread_before and not previous.done))
        return step

    run_model = runner._run_model
    unread_at_forward: list[bool] = []

    def forward_spy(batch):
        unread_at_forward.append(runner.last_step is not None and not runner.last_step.done)
        return run_model(batch)

    runner.launch, runner._run_model = spy, forward_spy
    plain = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm.generate(PROMPTS[:2], plain, use_tqdm=False)
    # the prefill has nothing before it; each decode then launches while the step before is out
    assert seen == [(False, False)] + [(True, True)] * 7
    seen.clear()
    penalized = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, presence_penalty=0.5,
                               repetition_penalty=1.2, min_tokens=6, bad_words=["the"])
    llm.generate(PROMPTS[:2], [plain, penalized], use_tqdm=False)
    assert seen == [(False, False)] + [(True, True)] * 7
    seen.clear()
    unread_at_forward.clear()
    bad_phrase = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, bad_words=["the sea"])
    llm.generate(PROMPTS[:2], [plain, bad_phrase], use_tqdm=False)
    assert seen == [(False, False)] + [(True, False)] * 7
    # ... but only after its forward was queued
    assert unread_at_forward == [False] + [True] * 7


def test_core_process_with_async_scheduling(make_llm):
    """The server's mode: the core process runs ahead too; a stop string and a cancelled stream
    end their requests there and every KV block comes back."""
    args = dict(max_model_len=256, kv_cache_memory=0.1, disable_log_stats=True)
    engine = AsyncLLM.from_engine_args(EngineArgs(async_scheduling=True, **args), core_process=True)
    greedy = SamplingParams(temperature=0, max_tokens=16)
    stop = SamplingParams(temperature=0, max_tokens=64, stop=["3"])
    try:
        async def main():
            async def forever():
                async for _ in engine.generate("Go on and on", SamplingParams(max_tokens=240, ignore_eos=True), "long"):
                    pass

            task = asyncio.create_task(forever())
            finals = await asyncio.gather(*[_final(engine, p, greedy, f"g{i}") for i, p in enumerate(PROMPTS[:3])],
                                          _final(engine, "Count to 3:", stop, "stop"))
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return finals

        *served, stopped = asyncio.run(main())
        _wait_until_idle(engine)
    finally:
        engine.shutdown()
    offline = make_llm(**args).generate(PROMPTS[:3] + ["Count to 3:"], [greedy] * 3 + [stop], use_tqdm=False)
    assert [s.outputs[0].token_ids for s in served] == [o.outputs[0].token_ids for o in offline[:3]]
    assert stopped.outputs[0].text == offline[3].outputs[0].text
    assert stopped.outputs[0].stop_reason == "3"
