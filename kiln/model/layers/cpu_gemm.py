"""oneDNN pre-packed weights for bfloat16 matmuls on CPU.

`F.linear` in bfloat16 reorders the weight into oneDNN's blocked layout on every call; with few
rows (decode) that reorder costs more than the product itself (measured here: a 576x3072 product
at 1 row takes 260 us through `F.linear` and 145 us packed, the speed of merely reading the
weight from memory; the 49152-row LM head 6.3 ms against ~2.3 ms). Packing once at load time
removes it and gives bitwise the same results, so it is on wherever oneDNN supports bfloat16.
Float32 keeps `F.linear` (MKL), the path the parity tests pin to transformers.

Where the native small-batch kernel exists (AVX512-BF16), the dense weight is kept beside the
packed one and products of at most 4 rows (decode at low concurrency) read it through the kernel,
at about twice oneDNN's speed there (see native/small_batch_linear.cpp). The cost is a second copy
of the weights in memory: speed over memory, as the workloads of this engine on CPU are small models.
"""

from __future__ import annotations

import torch
from torch import nn

from kiln.model.layers import native


def can_pack(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and weight.dim() == 2
            and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] dense -> an opaque oneDNN tensor for `packed_linear` (a copy: `weight` may be freed)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)


def keeps_dense_copy() -> bool:
    """Whether packed layers keep their dense weight for the small-batch kernel."""
    return native.small_batch_linear() is not None


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                  dense: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ W^T + bias with W packed by `pack_weight` (and `dense`, possibly empty, its plain copy)."""
    if x.dim() == 2 and x.shape[0] <= native.SMALL_BATCH_MAX_ROWS and dense.numel():
        kernel = native.small_batch_linear()
        if kernel is not None:
            return kernel(x, dense, bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def pack_model_weights(model: nn.Module) -> int:
    """Pack every layer that offers `pack_weights()` (linear layers, the LM head); returns how many packed."""
    return sum(bool(module.pack_weights()) for module in model.modules() if hasattr(module, "pack_weights"))
