"""Does torch.compile (inductor, CPU) pay? kiln's native step next to transformers' SmolLM2 eager and compiled.

    python benchmarks/torch_compile.py [--skip-compiled]

Two step shapes, the two that make up the serve benchmark at concurrency 64: a prefill of 8 prompts
x 256 tokens in one forward, and a batch-64 decode step at ~260 keys (transformers with a static
cache, so that every decode step has the same shapes and compiles once). kiln runs its default
path: on CPU all decoder layers of a step are one native call (model/native_stack.py), which leaves
inductor nothing to fuse, so the question is whether compiling the module path would beat it.
Prints milliseconds per step and each compile's seconds (the startup it would cost).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from kiln.bench.datasets import random_token_ids

BATCH, PROMPT, PREFILL_SEQS, DECODE_STEPS = 64, 256, 8, 24


def kiln_steps() -> tuple[float, float]:
    """(prefill ms, decode ms) of kiln's engine."""
    from kiln import LLM, SamplingParams

    llm = LLM(dtype="bfloat16", max_model_len=2048, max_num_seqs=BATCH)
    engine = llm.llm_engine

    def prefill_ms(seed: int) -> float:
        prompts = random_token_ids(PREFILL_SEQS, PROMPT, 49152, seed)  # fresh prompts: no prefix cache hits
        start = time.perf_counter()
        llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=1),
                     use_tqdm=False)
        return (time.perf_counter() - start) * 1e3

    prefill_ms(1)
    prefill = statistics.median(prefill_ms(seed) for seed in (2, 3, 4))
    params = SamplingParams(temperature=0, max_tokens=DECODE_STEPS + 8, ignore_eos=True)
    for i, prompt in enumerate(random_token_ids(BATCH, PROMPT, 49152, 5)):
        engine.add_request(f"decode-{i}", {"prompt_token_ids": prompt}, params)
    started: set[str] = set()
    while len(started) < BATCH:  # until every prompt is prefilled and has its first token
        started.update(out.request_id for out in engine.step() if out.outputs[0].token_ids)
    decode = median_step_ms(engine.step, DECODE_STEPS)
    while engine.has_unfinished_requests():
        engine.step()
    return prefill, decode


def median_step_ms(step: Callable[[], object], steps: int) -> float:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[2:])


def transformers_steps(compiled: bool) -> tuple[float, float, float]:
    """(prefill ms, decode ms, compile seconds) of transformers' model, eager or under torch.compile."""
    from transformers import AutoModelForCausalLM, GgufConfig, StaticCache

    from kiln.config import default_model_path

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True),
    ).eval()
    forward = torch.compile(model.forward, dynamic=False) if compiled else model.forward
    compile_s = 0.0
    with torch.inference_mode():
        ids = torch.tensor(random_token_ids(PREFILL_SEQS, PROMPT, 49152, 1))
        start = time.perf_counter()
        forward(input_ids=ids, logits_to_keep=1)
        compile_s += time.perf_counter() - start if compiled else 0.0
        prefill = median_step_ms(lambda: forward(input_ids=ids, logits_to_keep=1), 5)

        cache = StaticCache(config=model.config, max_cache_len=PROMPT + DECODE_STEPS + 8)
        prompts = torch.tensor(random_token_ids(BATCH, PROMPT, 49152, 5))
        out = model(input_ids=prompts, past_key_values=cache, cache_position=torch.arange(PROMPT), logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        position = PROMPT

        def decode_step() -> None:
            nonlocal token, position
            out = forward(input_ids=token, past_key_values=cache, cache_position=torch.tensor([position]))
            token, position = out.logits[:, -1].argmax(-1, keepdim=True), position + 1

        start = time.perf_counter()
        decode_step()
        compile_s += time.perf_counter() - start if compiled else 0.0
        decode = median_step_ms(decode_step, DECODE_STEPS)
    return prefill, decode, compile_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-compiled", action="store_true", help="Leave out torch.compile (about two minutes).")
    args = parser.parse_args()
    rows = [("kiln (native step)", *kiln_steps(), 0.0), ("transformers eager", *transformers_steps(False))]
    if not args.skip_compiled:
        rows.append(("transformers compiled", *transformers_steps(True)))
    print(f"\n{'engine':<24}{'prefill 8x256 ms':>18}{'decode b=64 ms':>16}{'compile s':>11}")
    for name, prefill, decode, compile_s in rows:
        print(f"{name:<24}{prefill:>18.0f}{decode:>16.1f}{compile_s:>11.0f}")


if __name__ == "__main__":
    main()
