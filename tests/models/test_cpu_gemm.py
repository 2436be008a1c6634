"""oneDNN-packed bfloat16 weights: the packed model must give bitwise the logits of the dense one
(the packing is a layout change, not an approximation), tied or not, prefill and decode."""

from __future__ import annotations

import pytest
import torch
import transformers

from kiln.config import LoadConfig, ModelConfig
from kiln.model.layers.cpu_gemm import can_pack, pack_model_weights
from kiln.model.loader import load_model

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2)
TOKENS = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(3)).tolist()

pytestmark = pytest.mark.skipif(not can_pack(torch.zeros(2, 2, dtype=torch.bfloat16)),
                                reason="this CPU has no oneDNN bfloat16 support")


def _load(path) -> torch.nn.Module:
    config = ModelConfig(model=str(path), tokenizer=str(path), dtype="bfloat16", max_model_len=128,
                         hf_config=transformers.AutoConfig.from_pretrained(path), served_model_name="t")
    return load_model(config, LoadConfig())


def _two_steps(model, make_kv_cache, run_step) -> torch.Tensor:
    cache = make_kv_cache(model)
    first = run_step(model, cache, [(0, TOKENS[0][:9], 0), (1, TOKENS[1][:4], 0)])
    second = run_step(model, cache, [(0, TOKENS[0][:10], 9), (1, TOKENS[1], 4)])
    return torch.cat([first, second])


@pytest.mark.parametrize("tied", [False, True])
def test_packed_weights_give_bitwise_the_dense_logits(tied, tmp_path, make_kv_cache, run_step):
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, tie_word_embeddings=tied)).save_pretrained(tmp_path)
    dense, packed = _load(tmp_path), _load(tmp_path)
    # 2 layers x (qkv, o, gate_up, down) + the LM head
    assert pack_model_weights(packed) == 9
    assert pack_model_weights(packed) == 0  # idempotent
    assert packed.model.layers[0].mlp.down_proj.weight.numel() == 0  # the dense copy is released
    assert (packed.model.embed_tokens.weight.numel() > 0) and (packed.lm_head.weight.numel() > 0) == tied
    assert torch.equal(_two_steps(packed, make_kv_cache, run_step), _two_steps(dense, make_kv_cache, run_step))


def test_float32_weights_stay_dense(tmp_path):
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).save_pretrained(tmp_path)
    config = ModelConfig(model=str(tmp_path), tokenizer=str(tmp_path), dtype="float32", max_model_len=128,
                         hf_config=transformers.AutoConfig.from_pretrained(tmp_path), served_model_name="t")
    assert pack_model_weights(load_model(config, LoadConfig())) == 0
