"""Pre-packed bfloat16 weights for CPU matmuls.

`F.linear` in bfloat16 hands the weight to oneDNN, which reorders it into its blocked layout on
every call; with few rows (decode) that reorder costs more than the product itself. So bfloat16
weights are packed once, at load:

- Where the CPU has AVX512-BF16 or AVX2, into key pairs for the native kernel (native/pair_packed_linear.cpp).
  It beats oneDNN's own packed products at every batch size measured here, with the weights
  streamed from memory as in a step (SmolLM2-135M, all layers plus the LM head): 7.5 against
  12.3 ms at 1 row, 13.8 against 18.7 at 16, 43.5 against 48.5 at 64, 1.35 against 1.41 s at
  2048 (426-431 GFLOP/s, ~95 % of the machine's peak). One layout serves decode and prefill, so
  the dense weight is dropped (a tied embedding keeps it for the lookup). On AVX2-only CPUs, where
  torch's bfloat16 product has no fast path at all (~14 GFLOP/s against ~110 for float32 on a
  2-core Zen 3 host), the kernel widens the weights in registers and multiplies in float32: all
  layers of SmolLM2-135M at 1 row 9.3-10.8 ms against 33-34 for dense float32 `F.linear` (the
  weights stream at half the bytes); at 64 rows 147 against 250 ms and at 2048 rows 4.1 against
  4.6-5.0 s (in a slower hour of the same host, `benchmarks/linear_kernels.py`).
- Elsewhere, where oneDNN supports bfloat16, into oneDNN's layout (`_reorder_linear_weight`), which
  gives bitwise the results of `F.linear`.

Float32 keeps `F.linear` (MKL), the path the parity tests pin to transformers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kiln.model.layers import native


def _pair_kernel() -> Callable[..., torch.Tensor] | None:
    return native.pair_packed_linear()


def can_pack(weight: torch.Tensor) -> bool:
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or weight.dim() != 2:
        return False
    return _pair_kernel() is not None or (
        torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] dense -> the packed weight `packed_linear` takes (a copy: `weight` may be freed)."""
    if _pair_kernel() is not None:
        return native.pack_weight_pairs(weight)
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)


def is_pair_packed(packed: torch.Tensor) -> bool:
    """Whether `pack_weight` packed this weight for the native kernels ([blocks, pairs, 32]; oneDNN's is 2-D)."""
    return packed.dim() == 3


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                  out_features: int) -> torch.Tensor:
    """x [..., in] @ W^T + bias with W packed by `pack_weight`."""
    if (kernel := _pair_kernel()) is not None:
        if x.dim() == 2:  # the models' case: no reshape (it would copy a strided view)
            return kernel(x, packed, bias, out_features)
        return kernel(x.reshape(-1, x.shape[-1]), packed, bias, out_features).view(*x.shape[:-1], out_features)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def pack_model_weights(model: nn.Module) -> int:
    """Pack every layer that offers `pack_weights()` (linear layers, the LM head); returns how many packed."""
    return sum(bool(module.pack_weights()) for module in model.modules() if hasattr(module, "pack_weights"))
