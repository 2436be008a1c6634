"""The native CPU attention kernels on SmolLM2-135M's shapes, over caches allocated as the server does.

    python benchmarks/attention_kernels.py [--seqs 64] [--keys 320] [--reps 12] [--block-size 16]
                                           [--cache-dtypes bfloat16 fp8 fp8_e5m2]

Decode: one step of 30 layers, --seqs sequences of --keys keys each, with three block orders:
scattered (a random permutation of the cache, as a long-running server's block tables look),
consecutive (each sequence's blocks side by side) and resident (every sequence reads the same
blocks, so the cache stays in L2: the arithmetic alone). Prefill: 8 prompts of 256 tokens over 30
layers, as one 2048-token chunk. Per cache dtype (`--kv-cache-dtype`'s values; bfloat16 is what
auto gives a bfloat16 model): bfloat16 caches take the pairs layout where the AVX512-BF16 kernels
run and the rows layout elsewhere, fp8 caches the rows layout (kv_layout.py); blocks of other
than 16 keys take the rows layout everywhere. Caches are huge-page
backed (worker/cpu_kv_memory.py) and filled before timing. The dtypes are timed in turn within
each repetition (this machine's speed drifts by tens of per cent within minutes, so compare
variants interleaved in one process, not runs of this script taken apart); prints the medians.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from kiln.config import CacheConfig
from kiln.model.layers import kv_layout, native
from kiln.model.layers.attention import prefill_kernel
from kiln.worker.cpu_kv_memory import CpuKVMemory

HEADS, KV_HEADS, HEAD_DIM, LAYERS = 9, 3, 64, 30
PROMPTS, PROMPT_LEN = 8, 256


def filled_caches(memory: CpuKVMemory, num_blocks: int, block: int,
                  dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    caches = []
    for _ in range(LAYERS):
        pair = tuple(memory.zeros((num_blocks, KV_HEADS, block, HEAD_DIM), dtype) for _ in range(2))
        for cache in pair:
            cache.copy_(kv_layout.to_cache_dtype(torch.randn(cache.shape), dtype))
        caches.append(pair)
    return caches


def interleaved_medians(runs: dict[str, Callable[[], None]], reps: int) -> dict[str, float]:
    """Each run once to warm up, then `reps` rounds of all runs in turn; median ms per run."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for name, run in runs.items():
        run()
    for _ in range(reps):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", type=int, default=64)
    parser.add_argument("--keys", type=int, default=320)
    parser.add_argument("--reps", type=int, default=12)
    parser.add_argument("--block-size", type=int, default=16, help="keys per cache block (a multiple of 16)")
    parser.add_argument("--cache-dtypes", nargs="+", default=["bfloat16", "fp8", "fp8_e5m2"])
    args = parser.parse_args()
    decode = native.paged_decode_attention()
    if decode is None:
        raise SystemExit("the native kernels do not run on this machine")
    torch.manual_seed(0)
    memory = CpuKVMemory()
    block = args.block_size
    blocks_per_seq = -(-args.keys // block)
    num = max(args.seqs * blocks_per_seq, PROMPTS * PROMPT_LEN // block)
    scale = HEAD_DIM**-0.5
    q = torch.randn(args.seqs, HEADS, HEAD_DIM, dtype=torch.bfloat16)
    lens = torch.full((args.seqs,), args.keys, dtype=torch.int32)
    used = args.seqs * blocks_per_seq
    tables = {
        "scattered": torch.randperm(used).to(torch.int32).view(args.seqs, blocks_per_seq),
        "consecutive": torch.arange(used, dtype=torch.int32).view(args.seqs, blocks_per_seq),
        "resident": torch.arange(blocks_per_seq, dtype=torch.int32).repeat(args.seqs, 1),
    }
    prefill_table = torch.randperm(PROMPTS * PROMPT_LEN // block).to(torch.int32).view(PROMPTS, -1)
    prefill_q = torch.randn(PROMPTS * PROMPT_LEN, HEADS, HEAD_DIM, dtype=torch.bfloat16)
    prefill_lens = torch.full((PROMPTS,), PROMPT_LEN, dtype=torch.int32)
    starts = torch.arange(0, PROMPTS * PROMPT_LEN + 1, PROMPT_LEN, dtype=torch.int32)

    decode_runs: dict[str, dict[str, Callable[[], None]]] = {order: {} for order in tables}
    prefill_runs: dict[str, Callable[[], None]] = {}
    for name in args.cache_dtypes:
        dtype = CacheConfig(cache_dtype="auto" if name == "bfloat16" else name).kv_torch_dtype(torch.bfloat16)
        caches = filled_caches(memory, num, block, dtype)
        pairs = kv_layout.uses_pairs_layout(caches[0][0])
        label = f"{name} ({'pairs' if pairs else 'rows'})"
        for order, table in tables.items():
            def step(table: torch.Tensor = table, caches=caches, pairs: bool = pairs) -> None:
                for k_cache, v_cache in caches:
                    decode(q, k_cache, v_cache, table, lens, scale, 0, pairs)
            decode_runs[order][label] = step
        prefill = prefill_kernel(caches[0][0], pairs, torch.bfloat16)
        if prefill is not None:
            def chunk(caches=caches, prefill=prefill) -> None:
                for k_cache, v_cache in caches:
                    prefill(prefill_q, k_cache, v_cache, prefill_table, prefill_lens, starts, scale, 0)
            prefill_runs[label] = chunk
    print(f"decode attention, {LAYERS} layers x {args.seqs} sequences x {args.keys} keys, blocks of {block} (ms):")
    for order, runs in decode_runs.items():
        medians = interleaved_medians(runs, args.reps)
        print(f"  {order:<12}" + "  ".join(f"{label} {ms:7.2f}" for label, ms in medians.items()))
    medians = interleaved_medians(prefill_runs, args.reps)
    print(f"prefill attention, {LAYERS} layers x {PROMPTS} prompts x {PROMPT_LEN} tokens (ms): "
          + "  ".join(f"{label} {ms:.1f}" for label, ms in medians.items()))


if __name__ == "__main__":
    main()
