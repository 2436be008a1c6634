"""CPU KV cache memory: lazily mapped, then faulted in chunk by chunk without touching contents."""

from __future__ import annotations

import ctypes
import mmap

import pytest
import torch

from kiln.worker.cpu_kv_memory import CHUNK_BYTES, CpuKVMemory

_libc = ctypes.CDLL(None, use_errno=True)


def resident_pages(region: mmap.mmap) -> list[bool]:
    """mincore(2): which 4 KiB pages of the mapping are in memory."""
    page = mmap.PAGESIZE
    vec = (ctypes.c_ubyte * (-(-len(region) // page)))()
    address = ctypes.addressof(ctypes.c_char.from_buffer(region))
    if _libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(len(region)), vec) != 0:
        pytest.skip(f"mincore failed: errno {ctypes.get_errno()}")
    return [bool(v & 1) for v in vec]


def test_prefault_maps_every_region_in_offset_order_and_keeps_contents():
    memory = CpuKVMemory()
    big = memory.zeros((5 * CHUNK_BYTES // 8,), torch.float32)  # 2.5 chunks
    small = memory.zeros((CHUNK_BYTES // 4,), torch.bfloat16)  # half a chunk
    big[:1000] = torch.arange(1000.0)  # a block in use: its contents must survive
    assert not all(resident_pages(memory.regions[0])) and not any(resident_pages(memory.regions[1]))  # lazy
    calls, more = 0, True
    while more:
        more = memory.prefault_chunk()
        calls += 1
        if calls == 2:  # the first chunk of both regions goes before the second chunk of either
            assert all(resident_pages(memory.regions[0])[:CHUNK_BYTES // mmap.PAGESIZE])
            assert all(resident_pages(memory.regions[1]))
        assert calls < 100
    if not memory.fully_prefaulted:
        pytest.skip("the kernel has no MADV_POPULATE_WRITE")
    assert calls == 6  # 3 chunk offsets x 2 regions, the small region done after the first
    assert all(resident_pages(memory.regions[0])) and all(resident_pages(memory.regions[1]))
    assert torch.equal(big[:1000], torch.arange(1000.0)) and torch.count_nonzero(big[1000:]) == 0
    assert not memory.prefault_chunk()


def test_nothing_to_prefault_without_regions():
    memory = CpuKVMemory()
    assert memory.fully_prefaulted and not memory.prefault_chunk()
