"""GGUF tensors to float32 in torch, for the block types of llama.cpp's common files.

gguf-py's `dequantize` works in numpy on one thread: 6-25 ns a value here, 2.6 of the 7.5 s a
SmolLM2 Q4_1 engine took to start. The same arithmetic as torch ops on the file's mapped bytes
runs on every core: 1.3-7 ns a value. Each function repeats gguf-py's float32 operations in its
order (a product, then a sum: no fused multiply-add), so the values are bitwise gguf-py's;
tests/models/test_gguf_dequant.py holds them to it. Other block types (the IQ and ternary
families) fall back to gguf-py.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

QK_K = 256
"""Values per super-block of the K-quants."""
_CHUNK_VALUES = 1 << 18
"""Values dequantized at a time, so that each function's temporaries stay in the caches. Whole
4096 x 11008 tensors ran at 9-13 ns a value, slower than gguf-py (which works in row groups too);
in chunks of 2**17 to 2**20 values, at 4-7 (the differences between those sizes were noise)."""


def dequantize(data: np.ndarray, tensor_type: Any) -> torch.Tensor:
    """A GGUF tensor's values as a float32 tensor of its logical shape (a new tensor: `data`,
    a read-only view of the file, is never written)."""
    name = tensor_type.name
    if name == "F32":
        return _as_tensor(data).clone()
    if name == "F16":
        return _as_tensor(data).float()
    blocks_of = _BLOCK_DEQUANTIZERS.get(name)
    if blocks_of is None:
        import gguf

        return torch.from_numpy(np.ascontiguousarray(gguf.dequantize(data, tensor_type)))
    from gguf import GGML_QUANT_SIZES

    block_size, type_size = GGML_QUANT_SIZES[tensor_type]
    blocks = _as_tensor(data).reshape(-1, type_size)
    values = torch.empty(blocks.shape[0], block_size)
    step = max(1, _CHUNK_VALUES // block_size)
    for start in range(0, blocks.shape[0], step):
        values[start:start + step] = blocks_of(blocks[start:start + step])
    return values.reshape(*data.shape[:-1], data.shape[-1] // type_size * block_size)


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over the array's memory: only ever read (every dequantizer builds new tensors)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(array))


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 at byte `start` of each block, as a float32 column."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _shifted(bytes_: torch.Tensor, shifts: list[int], mask: int) -> torch.Tensor:
    """`bytes_` [n, g, w] -> [n, g, len(shifts), w]: each byte shifted right by each shift, masked."""
    by = torch.tensor(shifts, dtype=torch.uint8).view(1, 1, -1, 1)
    return (bytes_.unsqueeze(2) >> by) & mask


def _bf16(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.bfloat16).float()


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = _f16(blocks, 0)
    q = _shifted(blocks[:, 2:].reshape(n, 1, 16), [0, 4], 0x0F).reshape(n, 32).to(torch.int8) - 8
    return d * q.float()


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    q = _shifted(blocks[:, 4:].reshape(n, 1, 16), [0, 4], 0x0F).reshape(n, 32).float()
    return d * q + m


def _high_bits(bits: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1's 32-bit field of fifth bits [n, 4] -> [n, 32], value i's bit at i."""
    return _shifted(bits.reshape(bits.shape[0], 4, 1), list(range(8)), 0x01).reshape(-1, 32)


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = _f16(blocks, 0)
    low = _shifted(blocks[:, 6:].reshape(n, 1, 16), [0, 4], 0x0F).reshape(n, 32)
    q = (low | (_high_bits(blocks[:, 2:6]) << 4)).to(torch.int8) - 16
    return d * q.float()


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    low = _shifted(blocks[:, 8:].reshape(n, 1, 16), [0, 4], 0x0F).reshape(n, 32)
    q = (low | (_high_bits(blocks[:, 4:8]) << 4)).float()
    return d * q + m


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0)
    return blocks[:, 2:].contiguous().view(torch.int8).float() * d


def _q2_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    scales = blocks[:, :16]
    d, dmin = _f16(blocks, 80), _f16(blocks, 82)
    scale = (d * (scales & 0x0F).float()).view(n, QK_K // 16, 1)
    offset = (dmin * (scales >> 4).float()).view(n, QK_K // 16, 1)
    q = _shifted(blocks[:, 16:80].reshape(n, 2, 32), [0, 2, 4, 6], 0x03).reshape(n, QK_K // 16, 16).float()
    return (scale * q - offset).reshape(n, QK_K)


def _q3_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    packed = blocks[:, 96:108]
    low = _shifted(packed[:, :8].reshape(n, 1, 8), [0, 4], 0x0F).reshape(n, 16)
    high = _shifted(packed[:, 8:].reshape(n, 1, 4), [0, 2, 4, 6], 0x03).reshape(n, 16)
    scales = ((low | (high << 4)).to(torch.int8) - 32).float()
    scale = (_f16(blocks, 108) * scales).view(n, 16, 1)
    q_low = _shifted(blocks[:, 32:96].reshape(n, 2, 32), [0, 2, 4, 6], 0x03).reshape(n, 16, 16)
    # the high bit set means no offset, clear means -4
    q_high = _shifted(blocks[:, :32].reshape(n, 1, 32), list(range(8)), 0x01).reshape(n, 16, 16) ^ 1
    q = (q_low.to(torch.int8) - (q_high << 2).to(torch.int8)).float()
    return (scale * q).reshape(n, QK_K)


def _k_scale_and_offset(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's per-32-value scale and offset [n, 8, 1]: d and dmin times the eight 6-bit scales
    and mins packed in bytes 4-15."""
    n = blocks.shape[0]
    scale_bits, min_bits, shared_bits = blocks[:, 4:16].reshape(n, 3, 4).unbind(1)
    sc = torch.cat([scale_bits & 0x3F, (shared_bits & 0x0F) | ((scale_bits >> 2) & 0x30)], dim=-1)
    mins = torch.cat([min_bits & 0x3F, (shared_bits >> 4) | ((min_bits >> 2) & 0x30)], dim=-1)
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    return (d * sc.float()).view(n, 8, 1), (dmin * mins.float()).view(n, 8, 1)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    scale, offset = _k_scale_and_offset(blocks)
    q = _shifted(blocks[:, 16:].reshape(n, 4, 32), [0, 4], 0x0F).reshape(n, 8, 32).float()
    return (scale * q - offset).reshape(n, QK_K)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    scale, offset = _k_scale_and_offset(blocks)
    low = _shifted(blocks[:, 48:].reshape(n, 4, 32), [0, 4], 0x0F).reshape(n, 8, 32)
    high = _shifted(blocks[:, 16:48].reshape(n, 1, 32), list(range(8)), 0x01).reshape(n, 8, 32)
    q = (low | (high << 4)).float()
    return (scale * q - offset).reshape(n, QK_K)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float()
    d = _f16(blocks, 208)
    scale = (d * scales).view(n, QK_K // 16, 1)
    low = _shifted(blocks[:, :128].reshape(n, 2, 64), [0, 4], 0x0F).reshape(n, 8, 32)
    high = _shifted(blocks[:, 128:192].reshape(n, 2, 32), [0, 2, 4, 6], 0x03).reshape(n, 8, 32)
    q = (low | (high << 4)).to(torch.int8) - 32
    return (scale * q.view(n, QK_K // 16, 16).float()).reshape(n, QK_K)


_BLOCK_DEQUANTIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "BF16": _bf16, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
    "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}
