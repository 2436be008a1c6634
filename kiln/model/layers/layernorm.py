"""RMSNorm computed exactly as transformers' LlamaRMSNorm, with an optional fused residual add
(in bfloat16 on CPU one native kernel does both: native/elementwise.cpp)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kiln.model.layers import native


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # float32 statistics, cast back to the input dtype, then the weight (HF's order, for parity);
        # torch's fused rms_norm gives bitwise the same values as HF's x * rsqrt(mean(x^2) + eps)
        normed = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        return self.weight * normed.to(x.dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x); with `residual`, first x = x + residual and return (norm(x), x)."""
        if (ops := native.fused_bf16_ops(x)) is not None:
            normed, summed = ops.add_rms_norm(x, residual, self.weight, self.eps)
            return normed if residual is None else (normed, summed)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"
