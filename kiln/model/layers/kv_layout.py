"""How the keys and values of a KV cache tile lie in memory, and the torch code for the pairs layout.

Every layer's caches are [num_blocks, num_kv_heads, block_size, head_dim]; one (block, kv head)
pair is a contiguous tile of block_size keys. Inside a tile, one of two layouts:

- rows: each key's head_dim values contiguous, [block_size][head_dim]. Any dtype, block size and
  device; what the tensor's shape says.
- pairs: bfloat16 CPU caches with 16-key blocks and head_dim a multiple of 32 (up to 256), where
  the AVX512-BF16 kernels run. The tiles hold the operands of vdpbf16ps as they lie: K as
  [head_dim / 2][16 keys][2], so that one 64-byte line holds a pair of dimensions of all 16 keys
  and a tile's 16 scores accumulate in the lanes of head_dim / 2 instructions (no horizontal sums,
  no transposes); V as [8 key pairs][head_dim][2], so that one instruction multiplies 16
  dimensions of two keys by their two probabilities. Decode attention over the cache does about
  half the arithmetic of the rows layout, and the prefill kernel no longer transposes each tile
  for every 16 query positions that read it.

The native kernels read and write the pairs layout themselves; the functions below let the torch
path (the reference, and the fallback of each kernel) do the same.

Independently of the layout, a cache may store its values in an fp8 format (`--kv-cache-dtype
fp8`, `fp8_e5m2`: rows layout only): half a bfloat16 cache's bytes per token, so twice the tokens in
the same memory and half the bytes a decode step reads. Values are cast with scale 1.0, saturating
at the format's largest finite value, and widened back exactly (every fp8 value is a bfloat16 one).
"""

from __future__ import annotations

import torch

from kiln.model.layers import native

PAIRS_BLOCK_SIZE = 16
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def is_fp8(cache: torch.Tensor) -> bool:
    return cache.dtype in FP8_DTYPES


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` as a cache of `dtype` stores it: fp8 formats saturate at their largest finite value (as
    the native write does; torch's own cast to fp8_e5m2 overflows to inf instead). NaN stays NaN."""
    if dtype in FP8_DTYPES:
        limit = torch.finfo(dtype).max
        return x.clamp(-limit, limit).to(dtype)
    return x.to(dtype)


def uses_pairs_layout(k_cache: torch.Tensor) -> bool:
    """Whether a cache of this shape, dtype and device is kept in the pairs layout on this machine."""
    head_dim = k_cache.shape[3]
    return (k_cache.device.type == "cpu" and k_cache.dtype == torch.bfloat16
            and k_cache.shape[2] == PAIRS_BLOCK_SIZE and head_dim % 32 == 0 and head_dim <= 256
            and native.pairs_layout_available())


def write_pairs(k_cache: torch.Tensor, v_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                slot_mapping: torch.Tensor) -> None:
    """Store each token's key and value rows ([T, kv_heads * head_dim]) at its slot."""
    num_blocks, num_kv_heads, block_size, head_dim = k_cache.shape
    block, offset = slot_mapping // block_size, slot_mapping % block_size
    k_tiles = k_cache.view(num_blocks, num_kv_heads, head_dim // 2, block_size, 2)
    k_tiles[block, :, :, offset] = key.reshape(-1, num_kv_heads, head_dim // 2, 2)
    v_tiles = v_cache.view(num_blocks, num_kv_heads, block_size // 2, head_dim, 2)
    v_tiles[block, :, offset // 2, :, offset % 2] = value.reshape(-1, num_kv_heads, head_dim)


def pairs_keys_as_rows(tiles: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Gathered K tiles [..., n, 16 * head_dim] -> rows [..., n * 16, head_dim] (a copy)."""
    rows = tiles.unflatten(-1, (head_dim // 2, PAIRS_BLOCK_SIZE, 2)).transpose(-3, -2)
    return rows.reshape(*tiles.shape[:-2], -1, head_dim)


def pairs_values_as_rows(tiles: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Gathered V tiles [..., n, 16 * head_dim] -> rows [..., n * 16, head_dim] (a copy)."""
    rows = tiles.unflatten(-1, (PAIRS_BLOCK_SIZE // 2, head_dim, 2)).transpose(-2, -1)
    return rows.reshape(*tiles.shape[:-2], -1, head_dim)
