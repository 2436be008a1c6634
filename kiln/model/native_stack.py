"""The decoder layers as one native call per step (native/decoder_stack.cpp), where they qualify.

In eager Python a batch-1 decode step of SmolLM2-135M spends ~2.3 ms of its ~12 ms forward on
module calls, dispatcher trips and tensor views around ~300 small kernels. `decoder_stack` runs
the same kernels, in the same order, from C++, so the results are bitwise those of the module path.

It takes a model whose every layer offers `native_weights()` (model/common.py says when: pair-packed
bfloat16 weights, SiLU, no subclass overriding a forward; biases and Qwen3's q/k norms are fine), all layers
bound to caches of one layout (bfloat16 or fp8 values), and a step whose attention groups are contiguous rows (decodes
first, as the scheduler orders them) with any prefill group on caches a native prefill kernel
reads (attention.prefill_kernel). Anything else runs the modules, which stay the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kiln.model.forward_context import get_attn_metadata
from kiln.model.layers import native
from kiln.model.layers.attention import Attention, prefill_kernel, step_plan
from kiln.model.layers.kv_layout import FP8_DTYPES

_CACHE_DTYPES = (torch.bfloat16, *FP8_DTYPES)  # the stack's activations are bfloat16


@dataclass
class NativeLayerWeights:
    """One layer's tensors in the order decoder_stack reads them."""

    weights: list[torch.Tensor]  # input norm, qkv, o, post-attention norm, gate_up, down (packed)
    biases: list[torch.Tensor | None]  # qkv, o, gate_up, down
    qk_norms: list[torch.Tensor]  # q norm, k norm; empty without them
    eps: set[float]  # of all the layer's norms


class NativeDecoderStack:
    """The flat argument lists of `decoder_stack` for one binding of the layers' KV caches."""

    def __init__(self, attentions: Sequence[Attention], layers: Sequence[NativeLayerWeights], eps: float,
                 intermediate_size: int) -> None:
        first = attentions[0]
        self.weights = [w for layer in layers for w in layer.weights]
        self.biases = [b for layer in layers for b in layer.biases]
        self.qk_norms = [w for layer in layers for w in layer.qk_norms]
        self.k_caches = [a.kv_cache[0] for a in attentions]  # type: ignore[index]
        self.v_caches = [a.kv_cache[1] for a in attentions]  # type: ignore[index]
        self.windows = [a.sliding_window or 0 for a in attentions]
        self.num_heads, self.num_kv_heads = first.num_heads, first.num_kv_heads
        self.block_size = self.k_caches[0].shape[2]
        self.scale, self.eps, self.intermediate_size = first.scale, eps, intermediate_size
        self.pairs_layout = first.pairs_layout
        # decoder_stack.cpp calls the same prefill kernel for the layout as Attention does
        self.native_prefill = prefill_kernel(self.k_caches[0], self.pairs_layout, torch.bfloat16) is not None
        self.kernel = native.decoder_stack()

    @classmethod
    def build(cls, layers: Sequence[Any]) -> NativeDecoderStack | None:
        """The stack for `layers` as bound now, or None when any layer must run as modules."""
        attentions = [layer.self_attn.attn for layer in layers]
        caches = [a.kv_cache for a in attentions]
        # the device first: elsewhere than on CPU nothing below (nor the kernels' build) is needed
        if (not layers or any(c is None or c[0].device.type != "cpu" or c[0].dtype not in _CACHE_DTYPES for c in caches)
                or native.decoder_stack() is None):
            return None
        per_layer = [layer.native_weights() for layer in layers]
        if any(weights is None for weights in per_layer):
            return None
        same = {(a.num_heads, a.num_kv_heads, a.head_dim, a.scale, a.pairs_layout) for a in attentions}
        eps = set().union(*(weights.eps for weights in per_layer))  # type: ignore[union-attr]
        has_qk_norms = {bool(weights.qk_norms) for weights in per_layer}  # type: ignore[union-attr]
        if len(same) != 1 or len(eps) != 1 or len(has_qk_norms) != 1:
            return None
        return cls(attentions, per_layer, eps.pop(), layers[0].mlp.down_proj.input_size)  # type: ignore[arg-type]

    def __call__(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(hidden, residual) after the last layer, or None when this step's batch must run as modules."""
        md = get_attn_metadata()
        plan = step_plan(md, self.num_kv_heads, self.block_size)
        decode = prefill = None
        num_tokens = hidden.shape[0]
        for group in plan.groups:
            if group.rows is None:
                begin, end = 0, num_tokens
            elif isinstance(group.rows, slice):
                begin, end = group.rows.start, group.rows.stop
            else:
                return None
            if group.max_query_len == 1:
                decode = (begin, end, group.block_tables, group.seq_lens)
            elif not self.native_prefill:
                return None
            else:
                prefill = (begin, end, group.block_tables, group.seq_lens, group.query_starts)
        d_begin, d_end, d_tables, d_lens = decode or (0, 0, None, None)
        p_begin, p_end, p_tables, p_lens, p_starts = prefill or (0, 0, None, None, None)
        return self.kernel(
            hidden, cos, sin, self.weights, self.biases, self.qk_norms, self.k_caches, self.v_caches, self.windows, md.slot_mapping,
            d_begin, d_end, d_tables, d_lens, p_begin, p_end, p_tables, p_lens, p_starts,
            self.num_heads, self.num_kv_heads, self.intermediate_size, self.eps, self.scale, self.pairs_layout)
