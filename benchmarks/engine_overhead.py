"""The engine's host-side cost per step with the model taken out: scheduling, the runner's input
preparation, sampling metadata, the sampler, the scheduler's update and output processing
(detokenization included). On a GPU these run while the GPU waits unless they are cheaper than the
step's kernels: a decode step of SmolLM2-135M at batch 64 takes a few ms there. On this CPU they
are a few per cent of a step.

The model (SmolLM2-135M's config, dummy weights) is replaced after loading by a stand-in that
returns preallocated hidden states and logits at once, so only the engine is timed. Steps are
decode steps at the given batch sizes (prompts of --input-len tokens, prefilled first and not
timed): greedy, random at temperature 1 (as vLLM's throughput benchmark samples), sampled with
temperature 0.8, top-p 0.95 and top-k 50, greedy with repetition and presence penalties, and random
with 5 logprobs.

    python benchmarks/engine_overhead.py --batch-sizes 1 64 256 --steps 64
    python benchmarks/engine_overhead.py --batch-sizes 256 --profile   # cProfile's top entries

`--device-ms D` simulates a GPU: each launched step keeps a simulated device busy for D ms after
the step before it, and reading a step's tokens back waits until the device would be done. With
synchronous scheduling a step then costs the host's work plus D; with `--async-scheduling` the
host prepares the next step while the device runs, so about the larger of the two. It shows that
the engine's own loop overlaps; whether a real GPU step has no hidden sync is for a GPU to show.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch
from transformers import PretrainedConfig

from kiln import LLM, SamplingParams
from kiln.worker.model_runner import LaunchedStep, ModelRunner


def stub_model(llm: LLM, max_rows: int) -> None:
    """Stub the offline engine's model (see `stub_runner_model`)."""
    core = llm.llm_engine.core
    stub_runner_model(core.worker.model_runner, core.config.model_config.hf_config, max_rows)


def stub_runner_model(runner: ModelRunner, hf_config: PretrainedConfig, max_rows: int,
                      step_seconds: float = 0.0) -> None:
    """Replace the forward and the LM head by views of preallocated tensors (rows vary, so tokens
    do). `step_seconds` > 0 makes each forward sleep that long with the GIL released, as a host
    thread waiting on a GPU's kernels does."""
    model = runner.model
    hidden = torch.zeros(max_rows, hf_config.hidden_size, dtype=torch.bfloat16)
    logits = torch.randn(max_rows, hf_config.vocab_size, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)

    def forward(input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if step_seconds:
            time.sleep(step_seconds)
        return hidden[:input_ids.shape[0]]

    model.forward = forward
    model.compute_logits = lambda rows: logits[:rows.shape[0]]


def simulate_device(runner: ModelRunner, step_seconds: float) -> None:
    """Steps occupy a simulated device one after another, `step_seconds` each; a step's `result()`
    waits for its end, as reading tokens back from a GPU waits for the stream."""
    busy_until = 0.0
    launch = runner.launch

    def launch_on_device(sched) -> LaunchedStep:
        nonlocal busy_until
        step = launch(sched)
        if not step.req_ids:
            return step
        busy_until = max(time.perf_counter(), busy_until) + step_seconds
        done_at, read_back = busy_until, step.result

        def result():
            if (wait := done_at - time.perf_counter()) > 0:
                time.sleep(wait)
            return read_back()

        step.result = result  # type: ignore[method-assign]
        return step

    runner.launch = launch_on_device  # type: ignore[method-assign]


def time_decode_steps(llm: LLM, batch_size: int, input_len: int, steps: int, params: SamplingParams,
                      profile: bool, final_only: bool) -> float:
    """Seconds per decode step of `batch_size` requests, averaged over `steps` steps."""
    engine = llm.llm_engine
    for i in range(batch_size):
        engine.add_request(f"b{batch_size}-{i}", {"prompt_token_ids": [(7 * i + j) % 40000 + 100
                                                                       for j in range(input_len)]}, params,
                           final_only=final_only)
    scheduler = engine.core.scheduler
    while scheduler.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in scheduler.running):
        engine.step()  # the prefills, untimed
    profiler = cProfile.Profile() if profile else None
    if profiler:
        profiler.enable()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    elapsed = time.perf_counter() - start
    if profiler:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    engine.abort_request([f"b{batch_size}-{i}" for i in range(batch_size)])
    while engine.has_unfinished_requests():
        engine.step()
    return elapsed / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="config source (default: the embedded SmolLM2)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per batch size (the best is shown)")
    parser.add_argument("--profile", action="store_true", help="print cProfile's top functions per batch size")
    parser.add_argument("--every-step-outputs", action="store_true",
                        help="report every request after every step, as a streaming server does (default: "
                             "only finished requests, as the offline LLM does)")
    parser.add_argument("--async-scheduling", action="store_true", help="launch each step before reading the last")
    parser.add_argument("--device-ms", type=float, default=0.0, help="simulate a device taking this long per step")
    args = parser.parse_args()
    max_batch = max(args.batch_sizes)
    llm = LLM(model=args.model, load_format="dummy", max_num_seqs=max_batch, enable_prefix_caching=False,
              max_num_batched_tokens=max(2048, max_batch), max_model_len=args.input_len + args.steps + 16,
              disable_log_stats=True, async_scheduling=args.async_scheduling)
    stub_model(llm, max(max_batch, 2048))
    if args.device_ms:
        simulate_device(llm.llm_engine.core.worker.model_runner, args.device_ms / 1e3)
    max_tokens = args.steps + 8
    modes = {"greedy": SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
             "random": SamplingParams(temperature=1.0, max_tokens=max_tokens, ignore_eos=True),  # vLLM's bench
             "sampled": SamplingParams(temperature=0.8, top_p=0.95, top_k=50, max_tokens=max_tokens, ignore_eos=True),
             "penalized": SamplingParams(temperature=0, repetition_penalty=1.1, presence_penalty=0.5,
                                         max_tokens=max_tokens, ignore_eos=True),
             "logprobs": SamplingParams(temperature=1.0, logprobs=5, max_tokens=max_tokens, ignore_eos=True)}
    print(f"{'batch':>5} {'mode':>8} {'ms/step':>9} {'us/request':>11}")
    for batch_size in args.batch_sizes:
        for mode, params in modes.items():
            best = min(time_decode_steps(llm, batch_size, args.input_len, args.steps, params, args.profile,
                                         not args.every_step_outputs)
                       for _ in range(1 if args.profile else args.repeats))
            print(f"{batch_size:>5} {mode:>8} {best * 1e3:>9.3f} {best * 1e6 / batch_size:>11.1f}", flush=True)


if __name__ == "__main__":
    main()
