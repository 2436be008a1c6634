"""kiln's torch dequantization of GGUF tensors against gguf-py's numpy `dequantize` (the oracle):
the same float32 values bit for bit, for every block type kiln dequantizes itself, on random
blocks and on every tensor of the embedded model."""

from __future__ import annotations

import zlib

import gguf
import numpy as np
import pytest
import torch

from kiln.model import gguf_dequant
from kiln.model.gguf_dequant import _BLOCK_DEQUANTIZERS, dequantize
from kiln.model.gguf_index import read_gguf_tensors

# byte offsets of each type's float16 fields (scales and minimums), which random bytes would fill
# with NaNs and infinities
_FLOAT16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q2_K": [80, 82],
                   "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def _assert_bitwise(ours: torch.Tensor, reference: np.ndarray) -> None:
    assert ours.dtype == torch.float32 and tuple(ours.shape) == reference.shape
    expected = torch.from_numpy(np.ascontiguousarray(reference))
    assert torch.equal(ours.view(torch.int32), expected.view(torch.int32))


def _random_tensor(type_name: str, rows: int, blocks_per_row: int) -> np.ndarray:
    """Random bytes shaped as a GGUF tensor of the type, with finite float16 fields."""
    rng = np.random.default_rng(zlib.crc32(type_name.encode()))  # str hashes change between runs
    qtype = gguf.GGMLQuantizationType[type_name]
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if type_name == "BF16":
        values = torch.from_numpy(rng.standard_normal((rows, blocks_per_row), dtype=np.float32)).bfloat16()
        return values.view(torch.uint8).numpy().reshape(rows, blocks_per_row * type_size)
    blocks = rng.integers(0, 256, (rows * blocks_per_row, type_size), dtype=np.uint8)
    for offset in _FLOAT16_FIELDS[type_name]:
        scales = (rng.standard_normal(len(blocks)) * 0.05).astype(np.float16)
        blocks[:, offset:offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, blocks_per_row * type_size)


def test_every_block_type_kiln_handles_has_a_test():
    assert set(_BLOCK_DEQUANTIZERS) == set(_FLOAT16_FIELDS) | {"BF16"}


@pytest.mark.parametrize("type_name", sorted(_BLOCK_DEQUANTIZERS))
def test_random_blocks_match_gguf(type_name):
    qtype = gguf.GGMLQuantizationType[type_name]
    data = _random_tensor(type_name, rows=6, blocks_per_row=3)
    _assert_bitwise(dequantize(data, qtype), gguf.dequantize(data, qtype))


@pytest.mark.parametrize("type_name", sorted(_BLOCK_DEQUANTIZERS))
def test_tensors_dequantized_in_several_chunks_match_gguf(type_name, monkeypatch):
    """(the last chunk shorter than the others)"""
    monkeypatch.setattr(gguf_dequant, "_CHUNK_VALUES", 64)
    qtype = gguf.GGMLQuantizationType[type_name]
    data = _random_tensor(type_name, rows=5, blocks_per_row=3)
    _assert_bitwise(dequantize(data, qtype), gguf.dequantize(data, qtype))


@pytest.mark.parametrize("type_name", ["F32", "F16"])
def test_plain_types_match_gguf(type_name):
    qtype = gguf.GGMLQuantizationType[type_name]
    data = np.random.default_rng(0).standard_normal((5, 7)).astype(type_name.lower().replace("f", "float"))
    before = data.copy()
    ours = dequantize(data, qtype)
    _assert_bitwise(ours, gguf.dequantize(data, qtype))
    ours += 1  # a new tensor: the source (in the loader, a read-only map of the file) is never written
    assert np.array_equal(data, before)


def test_other_types_fall_back_to_gguf():
    qtype = gguf.GGMLQuantizationType.TQ2_0
    assert qtype.name not in _BLOCK_DEQUANTIZERS
    data = np.random.default_rng(1).standard_normal((4, 256)).astype(np.float32)
    quantized = gguf.quantize(data, qtype)
    _assert_bitwise(dequantize(quantized, qtype), gguf.dequantize(quantized, qtype))


def test_the_embedded_model(smollm_path):
    _, tensors = read_gguf_tensors(smollm_path)
    assert {t.tensor_type.name for t in tensors} >= {"Q4_1", "Q8_0", "F32"}
    for tensor in tensors:
        _assert_bitwise(dequantize(tensor.data, tensor.tensor_type), gguf.dequantize(tensor.data, tensor.tensor_type))
