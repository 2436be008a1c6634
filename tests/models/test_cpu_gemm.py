"""oneDNN-packed bfloat16 weights: the packed model must give bitwise the logits of the dense one
(the packing is a layout change, not an approximation), tied or not, prefill and decode; the
native small-batch kernel must round like a bfloat16 product (checked against float32)."""

from __future__ import annotations

import pytest
import torch
import transformers

from kiln.config import LoadConfig, ModelConfig
from kiln.model.layers import native
from kiln.model.layers.cpu_gemm import can_pack, keeps_dense_copy, pack_model_weights
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
    # the dense copy stays only for the small-batch kernel (and a tied embedding)
    assert (packed.model.layers[0].mlp.down_proj.weight.numel() > 0) == keeps_dense_copy()
    assert packed.model.embed_tokens.weight.numel() > 0
    assert (packed.lm_head.weight.numel() > 0) == (tied or keeps_dense_copy())
    assert torch.equal(_two_steps(packed, make_kv_cache, run_step), _two_steps(dense, make_kv_cache, run_step))


def test_float32_weights_stay_dense(tmp_path):
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).save_pretrained(tmp_path)
    config = ModelConfig(model=str(tmp_path), tokenizer=str(tmp_path), dtype="float32", max_model_len=128,
                         hf_config=transformers.AutoConfig.from_pretrained(tmp_path), served_model_name="t")
    assert pack_model_weights(load_model(config, LoadConfig())) == 0


@pytest.mark.parametrize("rows,in_features", [(1, 64), (3, 100), (4, 576), (16, 40)])
def test_small_batch_kernel_rounds_like_a_bfloat16_product(rows, in_features):
    kernel = native.small_batch_linear()
    if kernel is None:
        pytest.skip("no native small-batch kernel on this machine")
    torch.manual_seed(0)
    x, weight = torch.randn(rows, in_features).bfloat16(), torch.randn(72, in_features).bfloat16()
    bias = torch.randn(72).bfloat16()
    exact = torch.nn.functional.linear(x.float(), weight.float(), bias.float())
    got = kernel(x, weight, bias)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 72)
    # float32 accumulation, one rounding of the product and one of the bias add: within 2 bf16 ulps
    assert ((got.float() - exact).abs() <= 2 * 2.0 ** -7 * exact.abs().clamp(min=1.0)).all()
    strided = torch.randn(rows, 2 * in_features).bfloat16()[:, ::2]
    assert torch.equal(kernel(strided, weight, None), kernel(strided.contiguous(), weight, None))


def test_decode_step_through_the_small_batch_kernel_stays_close(tmp_path, make_kv_cache, run_step):
    """A 1-row decode step (the kernel's case) against the dense F.linear model: bf16-level agreement."""
    if not keeps_dense_copy():
        pytest.skip("no native small-batch kernel on this machine")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).save_pretrained(tmp_path)
    dense, packed = _load(tmp_path), _load(tmp_path)
    pack_model_weights(packed)
    logits = []
    for model in (dense, packed):
        cache = make_kv_cache(model)
        run_step(model, cache, [(0, TOKENS[0][:9], 0)])
        logits.append(run_step(model, cache, [(0, TOKENS[0][:10], 9)]))
    scale = logits[0].abs().max()
    assert (logits[1] - logits[0]).abs().max() <= 0.05 * scale
