"""Greedy decoding of the embedded SmolLM2 equals transformers, token for token, in float32,
however the requests are batched, chunked, preempted or served from the prefix cache."""

from __future__ import annotations

import pytest
import torch

from kiln import SamplingParams
from fp8_reference import StoredAsFp8, assert_mostly_follows
from kiln.config import CacheConfig

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "def fibonacci(n):",
    "In 1492, Christopher Columbus",
    "List three primary colors:",
    "Translate to French: I like apples.",
    "The quick brown fox",
    "Q: What is 12 times 7?\nA:",
]
NUM_NEW = 64


@pytest.fixture(scope="module")
def reference(hf_smollm) -> list[list[int]]:
    model, tokenizer = hf_smollm
    outputs = []
    with torch.inference_mode():
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            generated = model.generate(
                ids, max_new_tokens=NUM_NEW, min_new_tokens=NUM_NEW, do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )
            outputs.append(generated[0, ids.shape[1]:].tolist())
    return outputs


# min_tokens masks EOS exactly as transformers' min_new_tokens does, so both run the full length.
GREEDY = SamplingParams(temperature=0, max_tokens=NUM_NEW, min_tokens=NUM_NEW)


def _token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_batched_equals_transformers(make_llm, reference):
    llm = make_llm(dtype="float32")
    assert _token_ids(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == reference


def test_alone_and_chunked_prefill(make_llm, reference):
    """One prompt at a time, and a tiny token budget that splits every prompt into chunks."""
    llm = make_llm(dtype="float32", max_num_batched_tokens=4, max_num_seqs=4)
    assert _token_ids(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == reference
    alone = [llm.generate(p, GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS[:2]]
    assert alone == reference[:2]


def test_preemption_keeps_outputs(make_llm, reference):
    """A KV cache far too small for all prompts at once forces preemption by recompute."""
    llm = make_llm(dtype="float32", num_gpu_blocks_override=12, block_size=16, max_model_len=160)
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert _token_ids(outputs) == reference
    assert llm.llm_engine.core.scheduler.make_stats().num_preemptions > 0


def test_prefix_cache_hits(make_llm, reference):
    """The second run reuses the cached prompt blocks and still produces the same tokens."""
    llm = make_llm(dtype="float32", block_size=4)
    first = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    hits_before = llm.llm_engine.core.scheduler.make_stats().prefix_cache_hits
    second = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert _token_ids(first) == _token_ids(second) == reference
    assert llm.llm_engine.core.scheduler.make_stats().prefix_cache_hits > hits_before
    # A prompt of one block or less has nothing to reuse: its last token is always recomputed.
    assert all(o.num_cached_tokens > 0 for o in second if len(o.prompt_token_ids) > 4)


@pytest.mark.parametrize("kv_cache_dtype", ["fp8"])  # e5m2 parts sooner; its kernels are tested in tests/models
def test_fp8_kv_cache_follows_transformers_over_the_same_stored_values(make_llm, hf_smollm, kv_cache_dtype):
    """--kv-cache-dtype fp8: greedy tokens follow transformers' when its cache stores the same fp8
    values (a model attends over its own key as stored, as kiln writes before attending), up to the
    roundings fp8_reference.py describes. Seen here: e4m3 parted after 23-26 tokens in two of four
    prompts (top-2 logprob gaps 8e-4 and 1e-2), e5m2 after 14-18 in two. The kernels' exactness over
    the stored values is tested in tests/models. A byte per value sizes the cache."""
    model, tokenizer = hf_smollm
    fp8 = CacheConfig(cache_dtype=kv_cache_dtype).kv_torch_dtype(torch.float32)
    prompts, num_new = PROMPTS[:4], 32
    expected = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            generated = model.generate(ids, max_new_tokens=num_new, min_new_tokens=num_new, do_sample=False,
                                       pad_token_id=tokenizer.eos_token_id, cache=StoredAsFp8(fp8))
            expected.append(generated[0, ids.shape[1]:].tolist())
    llm = make_llm(dtype="float32", kv_cache_dtype=kv_cache_dtype)
    greedy = SamplingParams(temperature=0, max_tokens=num_new, min_tokens=num_new, logprobs=5)
    assert_mostly_follows(llm.generate(prompts, greedy, use_tqdm=False), expected)
    worker = llm.llm_engine.core.worker
    assert {cache.dtype for layer in worker.attn_layers for cache in layer.kv_cache} == {fp8}
    # 0.25 GiB over blocks of 16 tokens x K and V x 3 kv heads x 64 dims x 30 layers, one byte each
    assert worker.num_blocks == 2**28 // (16 * 2 * 3 * 64 * 30)
