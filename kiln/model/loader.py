"""Build a model and fill its weights: safetensors, pt (*.bin), GGUF (dequantized) or dummy.

Every format is an iterator of (Hugging Face name, tensor) read one tensor at a time, so only one
copy of the weights (the model's) ever lives in memory; `model.load_weights` routes each tensor
to its parameter's `weight_loader` and refuses missing or unexpected names.
"""

from __future__ import annotations

import glob
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from kiln.config import LoadConfig, ModelConfig
from kiln.errors import InvalidRequestError, UnsupportedFeatureError
from kiln.logger import init_logger
from kiln.model.common import weights_mismatch_message
from kiln.model.registry import architecture_of, get_model_class

logger = init_logger(__name__)

Weights = Iterator[tuple[str, torch.Tensor]]


def load_model(model_config: ModelConfig, load_config: LoadConfig, device: str = "cpu") -> nn.Module:
    """The model of `model_config` on `device`, in its dtype, eval mode, with no gradients."""
    start = time.perf_counter()
    model_cls = get_model_class(architecture_of(model_config.hf_config))
    with _default_dtype(model_config.torch_dtype), torch.device(device):
        model = model_cls(model_config.hf_config)
    model.requires_grad_(False).eval()
    if model_config.enforce_eager and hasattr(model, "model"):
        model.model.enforce_eager = True
    load_format = load_config.load_format
    if load_format == "dummy":
        _init_dummy(model, model_config.seed)
    else:
        weights, total = _weights_iterator(model_config, load_format, model)
        progress = tqdm(weights, total=total, desc="Loading weights", unit="tensor", leave=False)
        try:
            loaded = model.load_weights(progress)
        except InvalidRequestError as exc:
            raise InvalidRequestError(f"{model_config.model}: {exc}") from exc
        missing = sorted({name for name, _ in model.named_parameters()} - loaded)
        if missing:
            message = weights_mismatch_message(model_cls.__name__, missing, [])
            raise InvalidRequestError(f"{model_config.model}: {message}")
    num_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    logger.info(
        "Loaded %s (%s, %s, format %s) in %.2f s: %.3f GiB of weights", model_config.model, model_cls.__name__,
        model_config.dtype, load_format, time.perf_counter() - start, num_bytes / 2**30,
    )
    return model


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _init_dummy(model: nn.Module, seed: int) -> None:
    """Small random weights (normal(0, 0.02)), norms at 1: finite, non-degenerate logits."""
    for name, param in model.named_parameters():
        generator = torch.Generator(device=param.device).manual_seed(seed + _stable_hash(name))
        if param.dim() == 1 and "norm" in name:
            param.data.fill_(1.0)
        else:
            param.data.normal_(0.0, 0.02, generator=generator)


def _stable_hash(name: str) -> int:
    return sum((i + 1) * ord(c) for i, c in enumerate(name)) % 2**31


def _weights_iterator(model_config: ModelConfig, load_format: str, model: nn.Module) -> tuple[Weights, int | None]:
    path = model_config.model
    if load_format == "gguf" or (load_format == "auto" and model_config.is_gguf):
        if not os.path.isfile(path):
            raise InvalidRequestError(f"load_format=gguf needs a .gguf file; {path} is not one.")
        return _gguf_weights(path, model_config.hf_config, model)
    if load_format not in ("auto", "safetensors", "pt"):
        raise UnsupportedFeatureError(f"load_format={load_format!r}; choose auto, safetensors, pt, gguf or dummy.")
    if not os.path.isdir(path):
        raise InvalidRequestError(f"{path} is not a model directory (load_format={load_format}).")
    if load_format in ("auto", "safetensors"):
        files = _safetensors_files(path)
        if files:
            return _safetensors_weights(files)
        if load_format == "safetensors":
            raise InvalidRequestError(f"No *.safetensors files in {path}.")
    files = sorted(f for f in glob.glob(os.path.join(path, "*.bin")) if not f.endswith("training_args.bin"))
    if not files:
        raise InvalidRequestError(f"No weights in {path}: expected *.safetensors or *.bin files.")
    return _pt_weights(files)


def _safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
    return sorted(glob.glob(os.path.join(path, "*.safetensors")))


def _safetensors_weights(files: list[str]) -> tuple[Weights, int]:
    from safetensors import safe_open

    total = 0
    for file in files:
        with safe_open(file, framework="pt") as f:
            total += len(f.keys())

    def weights() -> Weights:
        for file in files:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)

    return weights(), total


def _pt_weights(files: list[str]) -> tuple[Weights, int | None]:
    def weights() -> Weights:
        for file in files:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) serialization cannot be memory-mapped
                state = torch.load(file, map_location="cpu", weights_only=True)
            yield from state.items()
            del state

    return weights(), None


def _gguf_weights(path: str, hf_config: Any, model: nn.Module) -> tuple[Weights, int]:
    """Dequantize GGUF tensors one by one to float32 under their HF names (undoing llama.cpp's
    q/k row permutation for the llama architecture, as transformers' GGUF reader does)."""
    import gguf

    from kiln.model.gguf_dequant import dequantize
    from kiln.model.gguf_index import read_gguf_tensors

    arch, tensors = read_gguf_tensors(path)
    arch_ids = [key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == arch]
    if not arch_ids:
        raise UnsupportedFeatureError(f"GGUF architecture {arch!r} is not supported.")
    name_map = gguf.get_tensor_name_map(arch_ids[0], hf_config.num_hidden_layers)
    gguf_to_hf: dict[str, str] = {}
    for hf_name in _checkpoint_names(model):
        module, _, suffix = hf_name.rpartition(".")
        gguf_name = name_map.get_name(module)
        if gguf_name is not None:
            gguf_to_hf[f"{gguf_name}.{suffix}"] = hf_name
    num_heads = hf_config.num_attention_heads
    num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads

    def weights() -> Weights:
        for tensor in tensors:
            if tensor.name.startswith("rope_freqs"):  # llama3 rope factors, already in the config
                continue
            values = dequantize(tensor.data, tensor.tensor_type)
            if arch == "llama" and ".attn_q." in tensor.name:
                values = _unpermute_qk(values, num_heads)
            elif arch == "llama" and ".attn_k." in tensor.name:
                values = _unpermute_qk(values, num_kv_heads)
            yield gguf_to_hf.get(tensor.name, tensor.name), values

    return weights(), len(tensors)


def _unpermute_qk(weights: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp interleaves each head's rotary halves; restore HF's rotate_half layout."""
    dim = weights.shape[0] // num_heads // 2
    return weights.reshape(num_heads, dim, 2, *weights.shape[1:]).transpose(1, 2).reshape(weights.shape)


def _checkpoint_names(model: nn.Module) -> list[str]:
    """The HF checkpoint names a model expects: its parameters with fused modules split back."""
    names = []
    packed = {fused: [] for fused, _ in model.packed_modules_mapping.values()}
    for ckpt, (fused, _) in model.packed_modules_mapping.items():
        packed[fused].append(ckpt)
    for name, _ in model.named_parameters(remove_duplicate=False):
        for fused, parts in packed.items():
            if f".{fused}." in name:
                names.extend(name.replace(f".{fused}.", f".{part}.") for part in parts)
                break
        else:
            names.append(name)
    return names
