"""Activations of gated MLPs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kiln.model.layers import native


class SiluAndMul(nn.Module):
    """[..., 2 * d] (gate | up) -> silu(gate) * up, [..., d]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (ops := native.fused_bf16_ops(x)) is not None:
            return ops.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


_ACTIVATIONS = {"silu": SiluAndMul, "swish": SiluAndMul}


def get_gated_act(name: str) -> nn.Module:
    from kiln.errors import UnsupportedFeatureError

    if name not in _ACTIVATIONS:
        raise UnsupportedFeatureError(f"hidden_act={name!r} is not supported; kiln has {sorted(_ACTIVATIONS)}.")
    return _ACTIVATIONS[name]()
