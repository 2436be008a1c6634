"""The native CPU attention kernels on SmolLM2-135M's shapes, over caches allocated as the server does.

    python benchmarks/attention_kernels.py [--seqs 64] [--keys 320] [--reps 12]

Decode: one step of 30 layers, --seqs sequences of --keys keys each, with three block orders:
scattered (a random permutation of the cache, as a long-running server's block tables look),
consecutive (each sequence's blocks side by side) and resident (every sequence reads the same
blocks, so the cache stays in L2: the arithmetic alone). Prefill: 8 prompts of 256 tokens over 30
layers, as one 2048-token chunk. The caches are bfloat16 in the pairs layout (kv_layout.py),
huge-page backed (worker/cpu_kv_memory.py) and filled before timing. Prints the median over
--reps runs; this machine's speed drifts by tens of per cent within minutes, so compare variants
interleaved in one process, not runs of this script taken apart.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kiln.model.layers import native
from kiln.worker.cpu_kv_memory import CpuKVMemory

HEADS, KV_HEADS, HEAD_DIM, BLOCK, LAYERS = 9, 3, 64, 16, 30


def filled_caches(memory: CpuKVMemory, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    caches = []
    for _ in range(LAYERS):
        pair = tuple(memory.zeros((num_blocks, KV_HEADS, BLOCK, HEAD_DIM), torch.bfloat16) for _ in range(2))
        for cache in pair:
            cache.copy_(torch.randn(cache.shape))
        caches.append(pair)
    return caches


def median_ms(run, reps: int) -> float:
    run()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", type=int, default=64)
    parser.add_argument("--keys", type=int, default=320)
    parser.add_argument("--reps", type=int, default=12)
    args = parser.parse_args()
    decode, prefill = native.paged_decode_attention(), native.paged_prefill_attention()
    if decode is None or prefill is None or not native.pairs_layout_available():
        raise SystemExit("the native AVX512-BF16 kernels do not run on this machine")
    torch.manual_seed(0)
    memory = CpuKVMemory()
    blocks_per_seq = -(-args.keys // BLOCK)
    caches = filled_caches(memory, args.seqs * blocks_per_seq)
    scale = HEAD_DIM**-0.5
    q = torch.randn(args.seqs, HEADS, HEAD_DIM, dtype=torch.bfloat16)
    lens = torch.full((args.seqs,), args.keys, dtype=torch.int32)
    num = args.seqs * blocks_per_seq
    tables = {
        "scattered": torch.randperm(num).to(torch.int32).view(args.seqs, blocks_per_seq),
        "consecutive": torch.arange(num, dtype=torch.int32).view(args.seqs, blocks_per_seq),
        "resident": torch.arange(blocks_per_seq, dtype=torch.int32).repeat(args.seqs, 1),
    }
    print(f"decode attention, {LAYERS} layers x {args.seqs} sequences x {args.keys} keys:")
    for name, table in tables.items():
        def step(table: torch.Tensor = table) -> None:
            for k_cache, v_cache in caches:
                decode(q, k_cache, v_cache, table, lens, scale, 0, True)
        print(f"  {name:<12}{median_ms(step, args.reps):8.2f} ms")

    prompts, prompt_len = 8, 256
    prefill_blocks = prompts * prompt_len // BLOCK
    prefill_caches = caches if len(caches[0][0]) >= prefill_blocks else filled_caches(memory, prefill_blocks)
    prefill_table = torch.randperm(prefill_blocks).to(torch.int32).view(prompts, -1)
    prefill_q = torch.randn(prompts * prompt_len, HEADS, HEAD_DIM, dtype=torch.bfloat16)
    prefill_lens = torch.full((prompts,), prompt_len, dtype=torch.int32)
    starts = torch.arange(0, prompts * prompt_len + 1, prompt_len, dtype=torch.int32)

    def chunk() -> None:
        for k_cache, v_cache in prefill_caches:
            prefill(prefill_q, k_cache, v_cache, prefill_table, prefill_lens, starts, scale, 0)
    print(f"prefill attention, {LAYERS} layers x {prompts} prompts x {prompt_len} tokens: "
          f"{median_ms(chunk, args.reps):.1f} ms")


if __name__ == "__main__":
    main()
