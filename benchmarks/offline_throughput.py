"""Offline throughput: kiln's `LLM.generate` next to transformers' `generate`, same prompts, same run.

    python benchmarks/offline_throughput.py [--num-prompts 64] [--input-len 256] [--output-len 128]
        [--dtype bfloat16] [--skip-hf]

Prompts are random token ids (a fixed seed); every request produces exactly --output-len tokens
(ignore_eos), greedy so that both engines do the same work. Prints output tokens/s and total tokens/s
for each engine. kiln alone, with every engine flag: `kiln bench throughput` (kiln/bench/throughput.py),
whose prompt generator and timing this script shares.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from kiln.bench.datasets import random_token_ids as make_prompts
from kiln.bench.throughput import run_throughput


def run_kiln(args: argparse.Namespace, prompts: list[list[int]]) -> float:
    from kiln import LLM, SamplingParams

    llm = LLM(dtype=args.dtype, max_num_seqs=args.num_prompts)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    warmup = make_prompts(2, args.input_len, 49152, args.seed + 1)  # not the measured prompts: no cache hits
    llm.generate([{"prompt_token_ids": p} for p in warmup], params, use_tqdm=False)
    result = run_throughput(llm, prompts, params)
    assert result["total_output_tokens"] == args.num_prompts * args.output_len
    return result["elapsed_time"]


def run_transformers(args: argparse.Namespace, prompts: list[list[int]]) -> float:
    from transformers import AutoModelForCausalLM, GgufConfig

    from kiln.config import default_model_path

    path = default_model_path()
    # dequantized at load: the dense model in --dtype, as kiln runs it (transformers 5 otherwise keeps
    # the GGUF's 4-bit blocks and dequantizes them in every matmul)
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=getattr(torch, args.dtype),
        quantization_config=GgufConfig(dequantize=True),
    ).eval()
    batch = torch.tensor(prompts)  # equal lengths: no padding needed
    with torch.inference_mode():
        model.generate(batch[:2], max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
        start = time.perf_counter()
        out = model.generate(batch, max_new_tokens=args.output_len, min_new_tokens=args.output_len,
                             do_sample=False, pad_token_id=0)
        elapsed = time.perf_counter() - start
    assert out.shape[1] == args.input_len + args.output_len
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-hf", action="store_true", help="Measure kiln only.")
    args = parser.parse_args()
    prompts = make_prompts(args.num_prompts, args.input_len, 49152, args.seed)
    results = {"kiln": run_kiln(args, prompts)}
    if not args.skip_hf:
        results["transformers"] = run_transformers(args, prompts)
    out_tokens = args.num_prompts * args.output_len
    total_tokens = args.num_prompts * (args.input_len + args.output_len)
    print(f"\n{args.num_prompts} prompts x ({args.input_len} in + {args.output_len} out), {args.dtype}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'engine':<14}{'seconds':>10}{'output tok/s':>16}{'total tok/s':>16}")
    for name, seconds in results.items():
        print(f"{name:<14}{seconds:>10.1f}{out_tokens / seconds:>16.1f}{total_tokens / seconds:>16.1f}")


if __name__ == "__main__":
    main()
