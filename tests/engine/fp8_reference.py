"""The oracle of the fp8 KV cache tests: transformers attending over the values an fp8 cache stores,
and the check that kiln's greedy tokens follow it (test_smollm_greedy.py on CPU, test_cuda.py on a GPU).

Exact parity is impossible: a float32 rounding difference that puts a key on the other side of an
fp8 rounding boundary moves it by a whole fp8 step (12-25 %), later keys then differ by more than
rounding, and such flips cascade. So most tokens must agree, and where the two part, transformers'
token must be among kiln's top five.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from kiln.model.layers import kv_layout


class StoredAsFp8(DynamicCache):
    """transformers' cache holding keys and values as an fp8 KV cache stores them, widened back."""

    def __init__(self, fp8: torch.dtype) -> None:
        super().__init__()
        self.fp8 = fp8

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        stored = [kv_layout.to_cache_dtype(x, self.fp8).to(x.dtype) for x in (key_states, value_states)]
        return super().update(*stored, layer_idx, *args, **kwargs)


def assert_mostly_follows(outputs, expected: list[list[int]]) -> None:
    """`outputs`: kiln's RequestOutputs with logprobs=5; `expected`: transformers' tokens per prompt.
    At least half of all tokens agree before the first parting of each prompt, and at each parting
    transformers' token is among kiln's top five."""
    matched = 0
    for output, reference_ids in zip(outputs, expected, strict=True):
        got = output.outputs[0]
        for token, reference_id, top in zip(got.token_ids, reference_ids, got.logprobs):
            if token != reference_id:
                assert reference_id in top, f"transformers' token {reference_id} is not among kiln's top 5"
                break
            matched += 1
    assert matched >= sum(len(ids) for ids in expected) // 2
