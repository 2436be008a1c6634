"""Rotary position embedding with the inverse frequencies transformers computes.

The cos/sin tables are built once in float32 (position * inv_freq, times the rope type's
attention factor), stored in the model dtype, and indexed by position: the same numbers
`LlamaRotaryEmbedding` produces. Rotation is rotate_half (non-interleaved), as in HF.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kiln.errors import UnsupportedFeatureError
from kiln.model.layers import native

_SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _rope_parameters(hf_config: Any) -> dict[str, Any]:
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    params = dict(params)
    params.setdefault("rope_type", params.get("type", "default"))
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(hf_config, "rope_theta", 10000.0)
    return params


def _table_length(hf_config: Any, params: dict[str, Any]) -> int:
    """Positions to precompute: the context length as config.py derives it."""
    length = hf_config.max_position_embeddings
    if params["rope_type"] == "yarn" and params.get("original_max_position_embeddings") is None:
        length = int(length * params.get("factor", 1.0))
    return length


def _inv_freq(hf_config: Any, params: dict[str, Any], head_dim: int) -> tuple[torch.Tensor, float]:
    rope_type = params["rope_type"]
    if rope_type not in _SUPPORTED_ROPE_TYPES:
        raise UnsupportedFeatureError(
            f"rope_type={rope_type!r} is not supported; kiln supports {', '.join(_SUPPORTED_ROPE_TYPES)}."
        )
    if rope_type == "default":
        base = params["rope_theta"]
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).to(device="cpu", dtype=torch.float) / head_dim
        return 1.0 / (base**exponent), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")
    return inv_freq.float(), float(attention_factor)


class RotaryEmbedding(nn.Module):
    """positions [T] -> (cos, sin), each [T, head_dim] in the model dtype."""

    def __init__(self, hf_config: Any, head_dim: int) -> None:
        super().__init__()
        params = _rope_parameters(hf_config)
        dtype, device = torch.get_default_dtype(), torch.get_default_device()
        inv_freq, attention_factor = _inv_freq(hf_config, params, head_dim)
        positions = torch.arange(_table_length(hf_config, params), device="cpu").float()
        freqs = positions[:, None] * inv_freq[None, :]  # [max_positions, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_cache", (emb.cos() * attention_factor).to(device, dtype), persistent=False)
        self.register_buffer("sin_cache", (emb.sin() * attention_factor).to(device, dtype), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos_cache[positions], self.sin_cache[positions]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, num_heads, head_dim] rotated by cos/sin [T, head_dim] (bfloat16 on CPU: one native kernel)."""
    if x.stride(2) == 1 and x.stride(1) == x.shape[2] and (ops := native.fused_bf16_ops(x)) is not None:
        return ops.rotary(x, cos, sin)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin
