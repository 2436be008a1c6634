"""The sampler alone, one step of --rows rows of a --vocab vocabulary, per sampling feature.

    python benchmarks/sampler_features.py [--rows 64] [--vocab 49152] [--reps 10] [--torch]

The logits are bfloat16, as a bfloat16 model's LM head gives them, and peaked like a language
model's (a few tokens far above a normal spread), so filters keep small nuclei. Each feature is
timed with its `SamplingMetadata` built inside the timing, as the runner builds it every step;
rows carry 256 prompt and 64 output tokens (what penalties read). The last line times the
logprobs of --rows x 4 prompt positions, as `prompt_logprobs` computes them. `--torch` turns the
native CPU kernels off (as `KILN_NATIVE_KERNELS=0` does). Prints the median
over --reps of each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from kiln.sampling.metadata import SamplingMetadata, SamplingRow
from kiln.sampling.params import SamplingParams
from kiln.sampling.sampler import Sampler, compute_logprobs

FEATURES: dict[str, dict] = {
    "greedy": dict(temperature=0.0),
    "random (temperature 1)": dict(temperature=1.0),
    "temperature 0.7": dict(temperature=0.7),
    "top-p 0.9": dict(temperature=0.7, top_p=0.9),
    "top-k 50": dict(temperature=0.7, top_k=50),
    "top-k 50 + top-p 0.95": dict(temperature=0.8, top_k=50, top_p=0.95),
    "min-p 0.05": dict(temperature=0.7, min_p=0.05),
    "seeded": dict(temperature=0.7, seed=1),
    "logit_bias (2 tokens)": dict(temperature=0.7, logit_bias={5: 2.0, 7: -100.0}),
    "allowed_token_ids (100)": dict(temperature=0.7, allowed_token_ids=list(range(100))),
    "repetition + presence penalties": dict(temperature=0.0, repetition_penalty=1.1, presence_penalty=0.5),
    "logprobs 5": dict(temperature=0.7, logprobs=5),
}


def median_ms(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def peaked_logits(rows: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    logits = torch.randn(rows, vocab, generator=generator) * 2
    top = torch.randint(0, vocab, (rows, 20), generator=generator)
    logits.scatter_add_(1, top, torch.rand(rows, 20, generator=generator) * 6 + 10)
    return logits.to(torch.bfloat16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--torch", action="store_true", help="the torch paths only (no native kernels)")
    args = parser.parse_args()
    if args.torch:
        os.environ["KILN_NATIVE_KERNELS"] = "0"  # read at the kernels' first (lazy) load
    generator = torch.Generator().manual_seed(0)
    logits = peaked_logits(args.rows, args.vocab, generator)
    prompt, output = list(range(100, 356)), list(range(400, 464))
    sampler = Sampler()
    print(f"{args.rows} rows x {args.vocab} ({'torch' if args.torch else 'native where built'}), ms per step")
    for name, kwargs in FEATURES.items():
        params = SamplingParams(**kwargs)

        def step() -> None:
            rows = [SamplingRow(params, prompt, output, torch.Generator().manual_seed(1) if params.seed else None)
                    for _ in range(args.rows)]
            sampler.forward(logits, SamplingMetadata.build(rows, args.vocab, "cpu"))

        print(f"{name:>32} {median_ms(step, args.reps):8.2f}", flush=True)
    positions = peaked_logits(4 * args.rows, args.vocab, generator)
    targets = torch.randint(0, args.vocab, (4 * args.rows,), generator=generator)
    elapsed = median_ms(lambda: compute_logprobs(positions, 1, targets), args.reps)
    print(f"{f'prompt logprobs 1, {4 * args.rows} positions':>32} {elapsed:8.2f}")


if __name__ == "__main__":
    main()
