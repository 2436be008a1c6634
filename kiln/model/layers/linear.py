"""Linear layers whose parameters know how to load themselves.

Each weight carries a `weight_loader(param, loaded, shard_id=None)`; packed layers (fused
q/k/v, fused gate/up) place each checkpoint shard at its row offset, so checkpoints keep their
Hugging Face names and are fused at load time. No tensor parallelism yet: every layer is whole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kiln.errors import InvalidRequestError
from kiln.model.layers.cpu_gemm import can_pack, is_pair_packed, pack_weight, packed_linear


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    """Copy a checkpoint tensor into `param` (casting dtype), refusing a shape mismatch."""
    if param.shape != loaded.shape:
        raise InvalidRequestError(
            f"Checkpoint tensor of shape {tuple(loaded.shape)} does not fit parameter {tuple(param.shape)}."
        )
    param.data.copy_(loaded)


class Linear(nn.Module):
    """y = x W^T + b, with W [output_size, input_size] loaded as is (and packed after loading on
    CPU in bfloat16, the dense copy dropped; see cpu_gemm)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.bias: nn.Parameter | None = None
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        self.packed_weight: torch.Tensor | None = None

    def pack_weights(self) -> bool:
        """Swap the dense weight for a packed copy where that pays (see cpu_gemm)."""
        if self.packed_weight is not None or not can_pack(self.weight):
            return False
        self.packed_weight = pack_weight(self.weight.data)
        self.weight.data = self.weight.data.new_empty(0)
        if self.bias is not None and is_pair_packed(self.packed_weight):
            # the native kernel adds biases in float32: widen once here (exact) instead of every call
            self.bias.data = self.bias.data.float()
        return True

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | str | None = None) -> None:
        default_weight_loader(param, loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_weight is not None:
            return packed_linear(x, self.packed_weight, self.bias, self.output_size)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size}, bias={self.bias is not None}"


class MergedLinear(Linear):
    """Several projections of the same input stacked on the output dim (gate_proj + up_proj);
    shard `i` of the checkpoint fills rows sum(output_sizes[:i]) : sum(output_sizes[:i+1])."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False) -> None:
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias)

    def shard_range(self, shard_id: int | str) -> tuple[int, int]:
        assert isinstance(shard_id, int), f"MergedLinear shards are numbered, got {shard_id!r}"
        start = sum(self.output_sizes[:shard_id])
        return start, self.output_sizes[shard_id]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | str | None = None) -> None:
        if shard_id is None:  # a checkpoint that is already fused
            default_weight_loader(param, loaded)
            return
        start, size = self.shard_range(shard_id)
        default_weight_loader(param.data.narrow(0, start, size), loaded)  # type: ignore[arg-type]


class QKVLinear(MergedLinear):
    """q_proj, k_proj and v_proj fused: output [num_heads*head_dim | 2 x num_kv_heads*head_dim]."""

    def __init__(
        self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False
    ) -> None:
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim
        super().__init__(hidden_size, [self.q_size, self.kv_size, self.kv_size], bias)

    def shard_range(self, shard_id: int | str) -> tuple[int, int]:
        index = {"q": 0, "k": 1, "v": 2}[shard_id] if isinstance(shard_id, str) else shard_id
        return super().shard_range(index)
