"""Engine arguments: validation with messages a person can act on, and vLLM's resolution rules."""

from __future__ import annotations

import json

import pytest

from kiln.config import EngineArgs, parse_max_model_len
from kiln.errors import InvalidRequestError, UnsupportedFeatureError


def _tiny_config_dir(tmp_path, **overrides) -> str:
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
              "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 128,
              "vocab_size": 256, "max_position_embeddings": 512, "dtype": "bfloat16"}
    config.update(overrides)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


@pytest.mark.parametrize(("text", "tokens"), [(4096, 4096), ("4096", 4096), ("8k", 8000), ("8K", 8192),
                                              ("32K", 32768), ("1m", 1_000_000), ("1M", 1_048_576)])
def test_max_model_len_suffixes(text, tokens):
    assert parse_max_model_len(text) == tokens


def test_max_model_len_garbage():
    with pytest.raises(InvalidRequestError, match="not a number"):
        parse_max_model_len("lots")


def test_max_model_len_from_config_and_too_large(tmp_path):
    path = _tiny_config_dir(tmp_path)
    assert EngineArgs(model=path, device="cpu").create_engine_config().model_config.max_model_len == 512
    with pytest.raises(InvalidRequestError, match=r"max_model_len=1024 is larger.*\(512"):
        EngineArgs(model=path, device="cpu", max_model_len=1024).create_engine_config()


def test_dtype_auto_keeps_bf16_checkpoint_and_honours_explicit(tmp_path):
    path = _tiny_config_dir(tmp_path)
    assert EngineArgs(model=path, device="cpu").create_engine_config().model_config.dtype == "bfloat16"
    config = EngineArgs(model=path, device="cpu", dtype="float").create_engine_config()
    assert config.model_config.dtype == "float32"
    with pytest.raises(InvalidRequestError, match="dtype='int8'"):
        EngineArgs(model=path, device="cpu", dtype="int8").create_engine_config()


def test_kv_cache_dtype_names_map_to_fp8_formats_and_others_are_refused_by_name(tmp_path):
    import torch

    path = _tiny_config_dir(tmp_path)
    for name, dtype in [("auto", torch.bfloat16), ("fp8", torch.float8_e4m3fn), ("fp8_e4m3", torch.float8_e4m3fn),
                        ("fp8_e5m2", torch.float8_e5m2)]:
        cache = EngineArgs(model=path, device="cpu", kv_cache_dtype=name).create_engine_config().cache_config
        assert cache.kv_torch_dtype(torch.bfloat16) == dtype
    with pytest.raises(UnsupportedFeatureError, match="--kv-cache-dtype fp8_inc"):
        EngineArgs(model=path, device="cpu", kv_cache_dtype="fp8_inc").create_engine_config()


def test_kv_cache_memory_is_a_byte_budget_on_either_device_and_cuda_profiles_without_one(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CPU_KVCACHE_SPACE", "3")
    path = _tiny_config_dir(tmp_path)

    def budget(**kwargs):
        return EngineArgs(model=path, **kwargs).create_engine_config().cache_config.kv_cache_memory_bytes

    assert budget(device="cpu") == 3 * 2**30
    assert budget(device="cpu", kv_cache_memory=0.5) == 2**29
    assert budget(device="cuda", kv_cache_memory=1.5) == 3 * 2**29
    assert budget(device="cuda") is None  # the worker profiles a forward against gpu_memory_utilization
    with pytest.raises(InvalidRequestError, match="kv_cache_memory=0"):
        budget(device="cuda", kv_cache_memory=0)


def test_unknown_architecture_names_it_and_the_supported_ones(tmp_path):
    path = _tiny_config_dir(tmp_path, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(UnsupportedFeatureError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        EngineArgs(model=path, device="cpu").create_engine_config()


def test_unsupported_and_unknown_arguments_fail_clearly(tmp_path):
    path = _tiny_config_dir(tmp_path)
    with pytest.raises(UnsupportedFeatureError, match="tensor-parallel-size"):
        EngineArgs(model=path, tensor_parallel_size=2).create_engine_config()
    with pytest.raises(InvalidRequestError, match="Unknown engine arguments: max_num_sqes"):
        EngineArgs.from_kwargs(model=path, max_num_sqes=4).create_engine_config()
    with pytest.raises(InvalidRequestError, match="max_num_batched_tokens=4 must be at least max_num_seqs=8"):
        EngineArgs(model=path, device="cpu", max_num_batched_tokens=4, max_num_seqs=8).create_engine_config()


def test_missing_hub_model_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InvalidRequestError, match="not a local path and could not be fetched"):
        EngineArgs(model="kiln-tests/no-such-model").create_engine_config()
