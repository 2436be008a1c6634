"""Packed bfloat16 weights on CPU: the native pair-packed kernel rounds like a bfloat16 product
(checked against float32) for every shape class it tiles; the packed model stays at bfloat16-level
agreement with the dense one, tied or not; and the oneDNN fallback layout gives bitwise the dense
logits (it is a layout change, not an approximation)."""

from __future__ import annotations

import pytest
import torch
import transformers

from kiln.config import LoadConfig, ModelConfig
from kiln.model.layers import cpu_gemm, native
from kiln.model.layers.cpu_gemm import can_pack, pack_model_weights
from kiln.model.loader import load_model

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2)
TOKENS = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(3)).tolist()

pytestmark = pytest.mark.skipif(not can_pack(torch.zeros(2, 2, dtype=torch.bfloat16)),
                                reason="this CPU has neither the native kernels nor oneDNN bfloat16 support")


def _load(path) -> torch.nn.Module:
    config = ModelConfig(model=str(path), tokenizer=str(path), dtype="bfloat16", max_model_len=128,
                         hf_config=transformers.AutoConfig.from_pretrained(path), served_model_name="t")
    return load_model(config, LoadConfig())


def _two_steps(model, make_kv_cache, run_step) -> torch.Tensor:
    """A prefill step of two sequences, then a mixed step: one decode row and a chunk."""
    cache = make_kv_cache(model)
    first = run_step(model, cache, [(0, TOKENS[0][:9], 0), (1, TOKENS[1][:4], 0)])
    second = run_step(model, cache, [(0, TOKENS[0][:10], 9), (1, TOKENS[1], 4)])
    return torch.cat([first, second])


@pytest.fixture
def onednn_layout(monkeypatch):
    """Pack for oneDNN, as on a CPU without AVX512-BF16."""
    monkeypatch.setattr(cpu_gemm, "_pair_kernel", lambda: None)
    if not can_pack(torch.zeros(2, 2, dtype=torch.bfloat16)):
        pytest.skip("no oneDNN bfloat16 support")


@pytest.mark.parametrize("tied", [False, True])
def test_packed_model_agrees_with_the_dense_one(tied, tmp_path, make_kv_cache, run_step):
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, tie_word_embeddings=tied)).save_pretrained(tmp_path)
    dense, packed = _load(tmp_path), _load(tmp_path)
    # 2 layers x (qkv, o, gate_up, down) + the LM head
    assert pack_model_weights(packed) == 9
    assert pack_model_weights(packed) == 0  # idempotent
    # the dense weights are dropped, except a tied embedding's (the lookup reads it)
    assert packed.model.layers[0].mlp.down_proj.weight.numel() == 0
    assert packed.model.embed_tokens.weight.numel() > 0
    assert (packed.lm_head.weight.numel() > 0) == tied
    expected, got = _two_steps(dense, make_kv_cache, run_step), _two_steps(packed, make_kv_cache, run_step)
    if native.pair_packed_linear() is None:  # the oneDNN layout: the very same products
        assert torch.equal(got, expected)
    else:  # another float32 summation order: bfloat16-level differences, compounded over 2 layers
        assert (got - expected).abs().max() <= 0.05 * expected.abs().max()


def test_onednn_layout_gives_bitwise_the_dense_logits(onednn_layout, tmp_path, make_kv_cache, run_step):
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).save_pretrained(tmp_path)
    dense, packed = _load(tmp_path), _load(tmp_path)
    assert pack_model_weights(packed) == 9
    assert torch.equal(_two_steps(packed, make_kv_cache, run_step), _two_steps(dense, make_kv_cache, run_step))


def test_float32_weights_stay_dense(tmp_path):
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).save_pretrained(tmp_path)
    config = ModelConfig(model=str(tmp_path), tokenizer=str(tmp_path), dtype="float32", max_model_len=128,
                         hf_config=transformers.AutoConfig.from_pretrained(tmp_path), served_model_name="t")
    assert pack_model_weights(load_model(config, LoadConfig())) == 0


# rows: below, at and past one 8-row register tile, several tiles with a remainder; out features:
# whole 48-output panels, a 16-output tail block, a partial block; odd in features (a padded pair)
@pytest.mark.parametrize("rows,in_features,out_features", [
    (1, 64, 96), (3, 101, 40), (8, 576, 960), (9, 64, 50), (17, 40, 16), (64, 128, 100), (130, 66, 144)])
def test_pair_packed_kernel_rounds_like_a_bfloat16_product(rows, in_features, out_features):
    kernel = native.pair_packed_linear()
    if kernel is None:
        pytest.skip("no AVX512-BF16 kernels on this machine")
    torch.manual_seed(0)
    x, weight = torch.randn(rows, in_features).bfloat16(), torch.randn(out_features, in_features).bfloat16()
    bias = torch.randn(out_features).bfloat16()
    packed = native.pack_weight_pairs(weight)
    for b in (None, bias):
        exact = torch.nn.functional.linear(x.float(), weight.float(), None if b is None else b.float())
        got = kernel(x, packed, b, out_features)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, out_features)
        # float32 sums (another order than torch's) rounded to bfloat16 once: within one bf16 ulp
        assert ((got.float() - exact).abs() <= 2.0 ** -8 * exact.abs() + 1e-3 * in_features ** 0.5).all()
    strided = torch.randn(rows, 2 * in_features).bfloat16()
    assert torch.equal(kernel(strided[:, ::2], packed, None, out_features),
                       kernel(strided[:, ::2].contiguous(), packed, None, out_features))
    assert torch.equal(kernel(strided[:, :in_features], packed, None, out_features),
                       kernel(strided[:, :in_features].contiguous(), packed, None, out_features))
    assert kernel(x[:0], packed, None, out_features).shape == (0, out_features)
    with pytest.raises(RuntimeError, match="features"):
        kernel(x[:, 1:3], packed, None, out_features)


# Every output is one float32 sum in k order, however many rows and blocks the kernel takes at once
# (tiles of up to 6 or 8 rows, groups of up to 4 blocks for the rows left over, passes of 256 rows),
# so a row's result does not depend on the batch it came in: the 1-row products, stacked, are the
# batched ones.
@pytest.mark.parametrize("out_features", [16, 40, 96, 144, 208])
def test_pair_packed_products_do_not_depend_on_the_batch(out_features):
    kernel, fused = native.pair_packed_linear(), native.pair_packed_silu_gate_up()
    if kernel is None or fused is None:
        pytest.skip("no pair-packed kernels on this machine")
    torch.manual_seed(2)
    x, weight = torch.randn(600, 96).bfloat16(), torch.randn(out_features, 96).bfloat16()
    bias = torch.randn(out_features).bfloat16()
    packed = native.pack_weight_pairs(weight)
    singles = torch.cat([kernel(x[m:m + 1], packed, bias, out_features) for m in range(600)])
    intermediate = out_features // 16 // 2 * 16 or 16
    gate_up = native.pack_weight_pairs(torch.randn(2 * intermediate, 96).bfloat16())
    fused_singles = torch.cat([fused(x[m:m + 1], gate_up, None, intermediate) for m in range(600)])
    for rows in [*range(2, 14), 64, 70, 256, 300, 600]:
        assert torch.equal(kernel(x[:rows], packed, bias, out_features), singles[:rows])
        assert torch.equal(fused(x[:rows], gate_up, None, intermediate), fused_singles[:rows])


# rows around the 8-row tile; intermediate sizes of whole 48-column panels, a 2-block and a 1-block
# tail panel; odd in features (a padded pair); 150 rows: the AVX2 dense path
@pytest.mark.parametrize("rows,in_features,intermediate", [
    (1, 64, 48), (3, 101, 80), (8, 576, 1536), (13, 64, 64), (64, 128, 16), (70, 66, 96), (150, 66, 48)])
def test_fused_silu_gate_up_is_bitwise_silu_and_mul_of_the_product(rows, in_features, intermediate):
    fused, kernel = native.pair_packed_silu_gate_up(), native.pair_packed_linear()
    if fused is None or kernel is None:
        pytest.skip("no AVX512-BF16 kernels on this machine")
    torch.manual_seed(1)
    x = (3 * torch.randn(rows, 2 * in_features)).bfloat16()[:, ::2]  # strided rows; wide gate values
    weight = torch.randn(2 * intermediate, in_features).bfloat16()
    packed = native.pack_weight_pairs(weight)
    ops = native.fused_bf16_ops(x)
    for bias in (None, torch.randn(2 * intermediate).bfloat16()):
        expected = ops.silu_and_mul(kernel(x, packed, bias, 2 * intermediate))
        got = fused(x, packed, bias, intermediate)
        assert got.shape == (rows, intermediate) and torch.equal(got, expected)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        fused(x, packed, None, intermediate - 8)
