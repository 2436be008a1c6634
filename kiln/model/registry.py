"""Hugging Face `architectures` names -> kiln model classes, imported on first use."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kiln.errors import UnsupportedFeatureError

if TYPE_CHECKING:
    from torch import nn

# architecture -> (module under kiln.model, class name)
_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM"),
}
# GGUF-derived configs carry a model_type but no `architectures`
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM"}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def check_supported(architecture: str) -> None:
    """Raise UnsupportedFeatureError for an architecture kiln has no model for (without importing
    the model code, which the server's frontend never needs)."""
    if architecture not in _MODELS:
        raise UnsupportedFeatureError(
            f"Model architecture {architecture!r} is not supported; kiln supports: "
            f"{', '.join(supported_architectures())}."
        )


def get_model_class(architecture: str) -> type[nn.Module]:
    check_supported(architecture)
    module_name, class_name = _MODELS[architecture]
    return getattr(importlib.import_module(f"kiln.model.{module_name}"), class_name)


def architecture_of(hf_config: Any) -> str:
    """The config's first `architectures` entry, else the one its model_type implies."""
    architectures = getattr(hf_config, "architectures", None) or []
    if architectures:
        return architectures[0]
    model_type = getattr(hf_config, "model_type", "")
    return _MODEL_TYPES.get(model_type, model_type or "<none>")
