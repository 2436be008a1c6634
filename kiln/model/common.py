"""Blocks shared by the Llama-style families: rotary attention, gated MLP, decoder layer, the
decoder stack, and the causal-LM shell with its weight loading.

Submodules keep Hugging Face names (`self_attn`, `mlp`, `input_layernorm`, ...), except that
q/k/v and gate/up are fused (`qkv_proj`, `gate_up_proj`); `CausalLM.packed_modules_mapping`
routes each checkpoint shard to its slot. Model files only choose options (biases, qk-norm).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from kiln.errors import InvalidRequestError
from kiln.model.layers.activation import SiluAndMul, get_gated_act
from kiln.model.layers import native
from kiln.model.layers.attention import Attention
from kiln.model.layers.cpu_gemm import is_pair_packed
from kiln.model.layers.embedding import LMHead, VocabEmbedding
from kiln.model.layers.layernorm import RMSNorm
from kiln.model.layers.linear import Linear, MergedLinear, QKVLinear, default_weight_loader
from kiln.model.layers.rotary import RotaryEmbedding, apply_rotary
from kiln.model.native_stack import NativeDecoderStack, NativeLayerWeights


def head_dim_of(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def sliding_window_of(config: Any, layer_idx: int) -> int | None:
    """HF's rule: per-layer `layer_types` when the config has them (Qwen2/3), else Mistral's global window."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    return window if config.model_type == "mistral" else None


class RopeAttention(nn.Module):
    """Fused qkv projection, optional per-head q/k RMSNorm (Qwen3), RoPE, paged attention, o_proj."""

    def __init__(
        self, config: Any, layer_idx: int, qkv_bias: bool = False, o_bias: bool = False, qk_norm: bool = False
    ) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = head_dim_of(config)
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = QKVLinear(config.hidden_size, self.head_dim, self.num_heads, self.num_kv_heads, qkv_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, o_bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.attn = Attention(
            self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5,
            sliding_window=sliding_window_of(config, layer_idx),
        )

    def forward(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        num_tokens = hidden_states.shape[0]
        qkv = self.qkv_proj(hidden_states)
        if self.q_norm is not None and self.k_norm is not None:
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = self.q_norm(q.view(num_tokens, self.num_heads, self.head_dim))  # [T, H, D]
            k = self.k_norm(k.view(num_tokens, self.num_kv_heads, self.head_dim))  # [T, KH, D]
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        else:  # q and k side by side in qkv: one rotation for both heads' kinds
            qk = qkv[:, : self.q_size + self.kv_size].view(num_tokens, self.num_heads + self.num_kv_heads, -1)
            qk = apply_rotary(qk, cos, sin)
            q, k = qk[:, : self.num_heads], qk[:, self.num_heads:]
            v = qkv[:, self.q_size + self.kv_size:]
        out = self.attn(q.flatten(1), k.flatten(1), v)  # [T, H*D]
        return self.o_proj(out)


class GatedMLP(nn.Module):
    """down_proj(act(gate_proj(x)) * up_proj(x)), gate and up fused into one matmul. With pair-packed
    weights, SiLU and an intermediate size of whole 16-column blocks, the activation is fused into
    that matmul too (native/pair_packed_linear.cpp; bitwise the same values, one memory round trip
    of the [T, 2 * intermediate] products less)."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, bias: bool = False) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = MergedLinear(hidden_size, [intermediate_size, intermediate_size], bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias)
        self.act_fn = get_gated_act(hidden_act)
        self.fusable = type(self.act_fn) is SiluAndMul and intermediate_size % 16 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj
        if (self.fusable and gate_up.packed_weight is not None and is_pair_packed(gate_up.packed_weight)
                and (fused := native.pair_packed_silu_gate_up()) is not None):
            return self.down_proj(fused(x, gate_up.packed_weight, gate_up.bias, self.intermediate_size))
        return self.down_proj(self.act_fn(gate_up(x)))


class DecoderLayer(nn.Module):
    """Pre-norm block; the residual stream travels beside the hidden states (fused add + norm)."""

    def __init__(
        self, config: Any, layer_idx: int, *, qkv_bias: bool = False, o_bias: bool = False,
        qk_norm: bool = False, mlp_bias: bool = False,
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = RopeAttention(config, layer_idx, qkv_bias, o_bias, qk_norm)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, mlp_bias)

    def forward(
        self, hidden_states: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            hidden_states, residual = self.input_layernorm(hidden_states), hidden_states
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(hidden_states, cos, sin)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual

    def native_weights(self) -> NativeLayerWeights | None:
        """What native/decoder_stack.cpp reads for this layer, or None when the layer must run as
        modules: the native stack chains exactly the kernels of the forwards above, so it takes only
        layers that run them (pair-packed weights, SiLU, and no subclass with forwards of its own)."""
        attn, mlp = self.self_attn, self.mlp
        if (type(self).forward is not DecoderLayer.forward or type(attn).forward is not RopeAttention.forward
                or type(mlp).forward is not GatedMLP.forward or type(mlp.act_fn) is not SiluAndMul
                or type(attn.attn).forward is not Attention.forward
                or any(norm is not None and type(norm).forward is not RMSNorm.forward for norm in
                       (self.input_layernorm, self.post_attention_layernorm, attn.q_norm, attn.k_norm))):
            return None
        linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        if (any(linear.packed_weight is None or not is_pair_packed(linear.packed_weight) for linear in linears)
                or native.pair_packed_linear() is None):
            return None
        norms = [self.input_layernorm, self.post_attention_layernorm]
        qk_norms = [attn.q_norm, attn.k_norm] if attn.q_norm is not None and attn.k_norm is not None else []
        return NativeLayerWeights(
            weights=[self.input_layernorm.weight, attn.qkv_proj.packed_weight, attn.o_proj.packed_weight,
                     self.post_attention_layernorm.weight, mlp.gate_up_proj.packed_weight,
                     mlp.down_proj.packed_weight],
            biases=[linear.bias for linear in linears],
            qk_norms=[norm.weight for norm in qk_norms],
            eps={norm.eps for norm in norms + qk_norms},
        )


class DecoderModel(nn.Module):
    """Embedding, `num_hidden_layers` decoder layers, final norm; one RoPE table shared by all layers."""

    layer_cls: ClassVar[type[DecoderLayer]] = DecoderLayer

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(self.layer_cls(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config, head_dim_of(config))
        self.enforce_eager = False  # --enforce-eager: always the modules
        self._native_stack: NativeDecoderStack | None = None
        self._native_stack_bound: object = None  # the KV cache binding the stack was decided for

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)  # [T, hidden_size]
        cos, sin = self.rotary_emb(positions)  # [T, head_dim] each
        stack = self.native_stack()
        if stack is not None and (out := stack(hidden_states, cos, sin)) is not None:
            hidden_states, residual = out
        else:
            hidden_states, residual = self.run_layers(hidden_states, cos, sin)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states

    def run_layers(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder layers as modules: (hidden, residual) after the last one."""
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(hidden_states, residual, cos, sin)
        return hidden_states, residual  # type: ignore[return-value]

    def native_stack(self) -> NativeDecoderStack | None:
        """The layers as one native call (model/native_stack.py), decided again whenever the worker
        binds new KV caches; None when they must run as modules."""
        if self.enforce_eager:
            return None
        bound = self.layers[0].self_attn.attn.kv_cache if len(self.layers) else None
        if bound is not self._native_stack_bound:
            self._native_stack_bound = bound
            self._native_stack = NativeDecoderStack.build(list(self.layers)) if bound is not None else None
        return self._native_stack


class CausalLM(nn.Module):
    """`model` + `lm_head` (tied to the embedding when the config says so) and strict weight loading."""

    model_cls: ClassVar[type[DecoderModel]] = DecoderModel
    # checkpoint submodule -> (fused submodule, shard id)
    packed_modules_mapping: ClassVar[dict[str, tuple[str, int | str]]] = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, hf_config: Any) -> None:
        super().__init__()
        self.config = hf_config
        self.model = self.model_cls(hf_config)
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        tied_to = self.model.embed_tokens if self.tie_word_embeddings else None
        self.lm_head = LMHead(hf_config.vocab_size, hf_config.hidden_size, tied_to)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions [num_tokens] (a flattened batch) -> hidden states [num_tokens, hidden_size]."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[n, hidden_size] -> logits [n, vocab_size] in the model dtype."""
        return self.lm_head(hidden_states)

    def checkpoint_name_to_param(self, name: str) -> tuple[str, int | str | None]:
        for ckpt, (packed, shard_id) in self.packed_modules_mapping.items():
            if f".{ckpt}." in name:
                return name.replace(f".{ckpt}.", f".{packed}."), shard_id
        return name, None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load HF-named tensors; return the parameter names fully loaded. Strict: a parameter left
        unloaded or a checkpoint tensor with no parameter raises InvalidRequestError naming them."""
        params = dict(self.named_parameters())  # a tied lm_head is not listed apart from embed_tokens
        shards: dict[str, set[int | str | None]] = {}
        unexpected: list[str] = []
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name or (self.tie_word_embeddings and name == "lm_head.weight"):
                continue
            target, shard_id = self.checkpoint_name_to_param(name)
            param = params.get(target)
            if param is None:
                unexpected.append(name)
                continue
            weight_loader = getattr(param, "weight_loader", default_weight_loader)
            try:
                weight_loader(param, tensor) if shard_id is None else weight_loader(param, tensor, shard_id)
            except InvalidRequestError as exc:
                raise InvalidRequestError(f"Weight {name}: {exc}") from exc
            shards.setdefault(target, set()).add(shard_id)
        missing = [missing for name in params for missing in self._missing_checkpoint_names(name, shards.get(name))]
        if missing or unexpected:
            raise InvalidRequestError(weights_mismatch_message(type(self).__name__, missing, unexpected))
        return set(params)

    def _missing_checkpoint_names(self, param_name: str, loaded: set[int | str | None] | None) -> list[str]:
        """Checkpoint names still owed to `param_name` (a fused parameter is owed each shard)."""
        if loaded is not None and None in loaded:
            return []
        owed = [(ckpt, packed) for ckpt, (packed, shard_id) in self.packed_modules_mapping.items()
                if f".{packed}." in param_name and shard_id not in (loaded or set())]
        if loaded is None and not owed:
            return [param_name]
        return [param_name.replace(f".{packed}.", f".{ckpt}.") for ckpt, packed in owed]


def weights_mismatch_message(model_name: str, missing: list[str], unexpected: list[str], limit: int = 10) -> str:
    def listed(names: list[str]) -> str:
        more = f" and {len(names) - limit} more" if len(names) > limit else ""
        return ", ".join(names[:limit]) + more

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing weights ({listed(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected checkpoint tensors ({listed(unexpected)})")
    return f"The checkpoint does not match {model_name}: " + "; ".join(parts) + "."
