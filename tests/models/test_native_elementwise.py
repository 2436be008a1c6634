"""The fused bfloat16 elementwise kernels against the eager torch ops they replace (transformers'
order of bfloat16 roundings): RoPE and SiLU-and-mul bitwise, residual add + RMSNorm bitwise in the
sum and within one bfloat16 rounding of the norm (float32 reductions may order differently)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kiln.model.layers import native

ops = native.fused_bf16_ops(torch.zeros(1, dtype=torch.bfloat16))
pytestmark = pytest.mark.skipif(ops is None, reason="the native kernels could not be built here")


def eager_rms_norm(x, weight, eps):
    return weight * F.rms_norm(x.float(), weight.shape, eps=eps).to(x.dtype)


def test_add_rms_norm_matches_eager():
    torch.manual_seed(0)
    x, residual = (torch.randn(37, 576) * 3).bfloat16(), (torch.randn(37, 576) * 3).bfloat16()
    weight = torch.randn(576).bfloat16()
    normed, summed = ops.add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(summed, x + residual)
    expected = eager_rms_norm(x + residual, weight, 1e-5)
    ulp = 2.0 ** (torch.floor(torch.log2(expected.float().abs().clamp(min=1e-30))) - 7)
    assert ((normed.float() - expected.float()).abs() <= ulp * 1.01).all()
    assert (normed == expected).float().mean() > 0.99
    alone, passthrough = ops.add_rms_norm(x, None, weight, 1e-5)
    assert passthrough.data_ptr() == x.data_ptr() or torch.equal(passthrough, x)
    assert ((alone.float() - eager_rms_norm(x, weight, 1e-5).float()).abs() <= 0.02 * alone.float().abs() + 1e-3).all()


def test_silu_and_mul_matches_eager():
    torch.manual_seed(0)
    x = (torch.randn(9, 2 * 1536) * 4).bfloat16()
    gate, up = x.chunk(2, dim=-1)
    expected = F.silu(gate) * up
    got = ops.silu_and_mul(x)
    # exp differs from torch's vectorized one by float32 ulps: at most one bfloat16 step apart
    assert (got == expected).float().mean() > 0.99
    assert ((got.float() - expected.float()).abs() <= 2 ** -6 * expected.float().abs() + 1e-6).all()


def test_rotary_matches_eager_on_a_strided_view():
    from kiln.model.layers.rotary import _rotate_half

    torch.manual_seed(0)
    qkv = torch.randn(11, (9 + 3 + 3) * 64).bfloat16()
    qk = qkv[:, : 12 * 64].view(11, 12, 64)  # row stride 15 * 64: the view the attention layer passes
    angles = torch.randn(11, 64)
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    expected = qk * cos[:, None] + _rotate_half(qk) * sin[:, None]
    assert torch.equal(ops.rotary(qk, cos, sin), expected)
