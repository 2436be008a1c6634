"""Token embedding and LM head (which may share the embedding's weight)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kiln.model.layers.cpu_gemm import can_pack, pack_weight, packed_linear
from kiln.model.layers.linear import default_weight_loader


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class LMHead(nn.Module):
    """hidden [n, hidden_size] -> logits [n, vocab_size] in the model dtype.

    The logits stay in the model dtype: the greedy fast path takes their argmax as they are (a
    float32 copy of 64 x 49k logits, and torch's float32 argmax over it, cost ~3 ms a step here),
    and whoever needs float32 (the sampler's other paths, logprobs, grammar masks) widens them,
    which is exact.

    On CPU in bfloat16 the product reads a packed copy of the weight (see cpu_gemm; a tied weight
    stays dense for the embedding lookup, so tying then costs one extra copy of the vocabulary
    matrix).
    """

    def __init__(self, vocab_size: int, hidden_size: int, tied_to: VocabEmbedding | None = None) -> None:
        super().__init__()
        if tied_to is not None:
            self.weight = tied_to.weight
        else:
            self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)
            self.weight.weight_loader = default_weight_loader
        self.tied = tied_to is not None
        self.vocab_size = vocab_size
        self.packed_weight: torch.Tensor | None = None

    def pack_weights(self) -> bool:
        if self.packed_weight is not None or not can_pack(self.weight):
            return False
        self.packed_weight = pack_weight(self.weight.data)
        if not self.tied:
            self.weight.data = self.weight.data.new_empty(0)
        return True

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.packed_weight is not None:
            return packed_linear(hidden_states, self.packed_weight, None, self.vocab_size)
        return F.linear(hidden_states, self.weight)
