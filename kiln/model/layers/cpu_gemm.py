"""oneDNN pre-packed weights for bfloat16 matmuls on CPU.

`F.linear` in bfloat16 reorders the weight into oneDNN's blocked layout on every call; with few
rows (decode) that reorder costs more than the product itself (measured here: a 576x3072 product
at 1 row takes 260 us through `F.linear` and 145 us packed, the speed of merely reading the
weight from memory; the 49152-row LM head 6.3 ms against ~2.3 ms). Packing once at load time
removes it and gives bitwise the same results, so it is on wherever oneDNN supports bfloat16.
Float32 keeps `F.linear` (MKL), the path the parity tests pin to transformers.
"""

from __future__ import annotations

import torch
from torch import nn


def can_pack(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and weight.dim() == 2
            and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] dense -> an opaque oneDNN tensor for `packed_linear` (a copy: `weight` may be freed)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] @ W^T + bias with W packed by `pack_weight`."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def pack_model_weights(model: nn.Module) -> int:
    """Pack every layer that offers `pack_weights()` (linear layers, the LM head); returns how many packed."""
    return sum(bool(module.pack_weights()) for module in model.modules() if hasattr(module, "pack_weights"))
