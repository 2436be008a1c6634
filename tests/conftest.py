"""Shared fixtures: the embedded model, a transformers reference, and engines that reuse weights.

Loading (dequantizing) the GGUF model takes many seconds, so kiln engines built in tests reuse
one loaded copy per (model, dtype) through a patched loader; the loader itself has its own tests.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# Without a GPU, Triton's interpreter runs the CUDA backend's kernels on CPU tensors in the tests; it
# is chosen when triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")



@pytest.fixture
def triton_attention_backend(monkeypatch):
    """Route attention through the CUDA backend's Triton kernel, which Triton's interpreter runs on CPU
    tensors here, with the cache written by index_copy_ and kept in the rows layout, as on CUDA (an
    AVX512-BF16 host would otherwise keep bfloat16 caches in the pairs layout the kernel does not read)."""
    from kiln.model.layers import attention, kv_layout, triton_attention

    if not triton_attention.available(torch.device("cpu")):
        pytest.skip("triton is not installed, or its interpreter is off (set above, before triton's import)")
    monkeypatch.setattr(attention, "_decode_kernel", lambda device: None)
    monkeypatch.setattr(attention, "prefill_kernel", lambda k_cache, pairs_layout, q_dtype: None)
    monkeypatch.setattr(attention, "_cache_writer", lambda k_cache: None)
    monkeypatch.setattr(kv_layout, "uses_pairs_layout", lambda k_cache: False)
    monkeypatch.setattr(attention, "_triton_kernel", lambda k_cache, pairs_layout: triton_attention.paged_attention)


class ReplayByRerun:
    """A CUDA graph stand-in for CPU: captures by running `fn`, replays by running it again into the
    captured output. Like a graph, a rerun sees only the static buffers and the attention metadata
    built at capture time (host-side lengths included), so a forward that read a step's host-side
    values would go wrong here as it would on a GPU."""

    replays = 0

    def capture(self, fn):
        self.fn = fn
        self.output = fn()
        return self.output

    def replay(self):
        type(self).replays += 1
        self.output.copy_(self.fn())


@pytest.fixture
def stand_in_graphs(monkeypatch):
    """Decode CUDA graphs on CPU (worker/cuda_graphs.py), replayed by `ReplayByRerun`; returns the
    class, whose `replays` counts them."""
    from kiln.worker import cuda_graphs

    monkeypatch.setattr(cuda_graphs, "supported", lambda device: True)
    monkeypatch.setattr(cuda_graphs, "graph_factory", lambda: ReplayByRerun)
    monkeypatch.setattr(ReplayByRerun, "replays", 0)
    return ReplayByRerun


_MODEL_CACHE: dict[tuple[str, str, str, str], torch.nn.Module] = {}


@pytest.fixture(scope="session")
def smollm_path() -> str:
    from kiln.config import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def hf_smollm(smollm_path: str):
    """transformers' own GGUF load of the embedded model, in float32: the reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = os.path.dirname(smollm_path), os.path.basename(smollm_path)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    model.eval()
    return model, tokenizer


def _cached_load_model(model_config, load_config, device="cpu"):
    from kiln.model import loader

    key = (model_config.model, model_config.dtype, load_config.load_format, str(device))
    if key not in _MODEL_CACHE:
        _MODEL_CACHE[key] = loader.load_model(model_config, load_config, device)
    return copy.deepcopy(_MODEL_CACHE[key])


@pytest.fixture
def cached_weights(monkeypatch):
    """Engines built while this fixture is active reuse one loaded copy of each model's weights."""
    import kiln.worker.worker as worker_module

    monkeypatch.setattr(worker_module, "load_model", _cached_load_model)


@pytest.fixture
def make_llm(cached_weights):
    """Build `kiln.LLM`s that share loaded weights; checks every engine's blocks come back."""
    from kiln import LLM

    engines = []

    def factory(**kwargs) -> LLM:
        kwargs.setdefault("kv_cache_memory", 0.25)
        kwargs.setdefault("max_model_len", 2048)
        kwargs.setdefault("disable_log_stats", True)
        llm = LLM(**kwargs)
        engines.append((llm, llm.llm_engine.core.scheduler.kv_cache_manager.num_free_blocks))
        return llm

    yield factory
    for llm, free_at_start in engines:
        assert not llm.llm_engine.has_unfinished_requests()
        assert llm.llm_engine.core.scheduler.kv_cache_manager.num_free_blocks == free_at_start, "KV blocks leaked"
