"""Every supported architecture, end to end through the engine, against transformers' greedy
generate on a tiny random model saved as safetensors (batched, chunked, with GQA and the
architecture's quirks: Qwen2 attention bias, Qwen3 q/k norm, Llama rope scaling, tied embeddings)."""

from __future__ import annotations

import pytest
import torch
import transformers

from kiln import LLM, SamplingParams

COMMON = dict(
    vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
)
CASES = {
    "llama": (transformers.LlamaConfig, dict(tie_word_embeddings=False)),
    "llama3-rope-tied": (transformers.LlamaConfig, dict(
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "qwen2": (transformers.Qwen2Config, dict(tie_word_embeddings=False)),
    "qwen3": (transformers.Qwen3Config, dict(tie_word_embeddings=True, head_dim=32)),
}
PROMPTS = [[5, 17, 33, 99, 4, 250, 31, 8, 77, 12, 3, 64, 65, 66, 90, 91, 92, 93], [7, 8, 9], [100, 200, 300, 42, 42]]
NUM_NEW = 24


def build_tiny_model(case, path):
    config_class, extra = CASES[case]
    config = config_class(**COMMON, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    return model, str(path)


@pytest.fixture(params=list(CASES))
def tiny_model(request, tmp_path):
    return build_tiny_model(request.param, tmp_path)


def test_greedy_matches_transformers(tiny_model):
    check_greedy_against_transformers(*tiny_model, device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("enforce_eager", [False, True], ids=["decode-graphs", "eager"])
def test_greedy_on_cuda_matches_transformers(tiny_model, enforce_eager):
    """The CUDA path on a GPU (the Triton kernel; decode graphs unless eager), against transformers
    on the same GPU."""
    check_greedy_against_transformers(*tiny_model, device="cuda", enforce_eager=enforce_eager)


@pytest.mark.parametrize("case", ["llama", "qwen3"])
def test_greedy_through_the_triton_kernel_matches_transformers(case, tmp_path, triton_attention_backend):
    """The CUDA backend's Triton attention kernel in the engine (run by Triton's interpreter on CPU):
    GQA, and Qwen3's head_dim of 32."""
    check_greedy_against_transformers(*build_tiny_model(case, tmp_path))


def test_greedy_through_decode_cuda_graphs_matches_transformers(tmp_path, triton_attention_backend, stand_in_graphs):
    """The CUDA decode path (worker/cuda_graphs.py) with a stand-in graph that replays by rerunning
    the capture (tests/conftest.py): batches of 3 decodes padded to the graph of 4 rows."""
    check_greedy_against_transformers(*build_tiny_model("llama", tmp_path))
    assert stand_in_graphs.replays > 0, "decode steps must have replayed graphs"


def check_greedy_against_transformers(model, path, device="cpu", **engine_kwargs):
    expected = []
    model = model.to(device)
    with torch.inference_mode():
        for ids in PROMPTS:
            out = model.generate(torch.tensor([ids], device=device), max_new_tokens=NUM_NEW, min_new_tokens=NUM_NEW,
                                 do_sample=False, pad_token_id=0)
            expected.append(out[0, len(ids):].tolist())
    # min_tokens masks EOS as transformers' min_new_tokens does.
    params = SamplingParams(temperature=0, max_tokens=NUM_NEW, min_tokens=NUM_NEW)
    prompts = [{"prompt_token_ids": ids} for ids in PROMPTS]
    for budget in (2048, 5):
        llm = LLM(model=path, device=device, dtype="float32", skip_tokenizer_init=True, kv_cache_memory=0.01,
                  max_num_batched_tokens=budget, max_num_seqs=4, disable_log_stats=True, **engine_kwargs)
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        assert got == expected, f"token budget {budget}"
