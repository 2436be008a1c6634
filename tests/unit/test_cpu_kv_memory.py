"""CPU KV cache memory: lazily mapped on 4 KiB pages, then faulted in chunk by chunk onto huge pages
without touching contents."""

from __future__ import annotations

import ctypes
import mmap

import pytest
import torch

from kiln.worker.cpu_kv_memory import CHUNK_BYTES, CpuKVMemory

_libc = ctypes.CDLL(None, use_errno=True)


def resident_pages(span: tuple[int, int]) -> list[bool]:
    """mincore(2): which 4 KiB pages of a tensor's memory (address, bytes) are in memory."""
    address, length = span
    vec = (ctypes.c_ubyte * (-(-length // mmap.PAGESIZE)))()
    if _libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(length), vec) != 0:
        pytest.skip(f"mincore failed: errno {ctypes.get_errno()}")
    return [bool(v & 1) for v in vec]


def huge_page_advice(span: tuple[int, int]) -> str | None:
    """The THP advice of the mapping that holds `span`'s first byte, from /proc/self/smaps ("hg": on,
    "nh": off), or None when the kernel does not say."""
    address = span[0]
    try:
        lines = open("/proc/self/smaps").read().splitlines()
    except OSError:
        return None
    inside = False
    for line in lines:
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and line.startswith("VmFlags:"):
            flags = line.split()[1:]
            return "hg" if "hg" in flags else "nh" if "nh" in flags else ""
    return None


def test_prefault_maps_every_region_in_offset_order_and_keeps_contents():
    memory = CpuKVMemory()
    big = memory.zeros((5 * CHUNK_BYTES // 8,), torch.float32)  # 2.5 chunks
    small = memory.zeros((CHUNK_BYTES // 4,), torch.bfloat16)  # half a chunk
    assert all(address % CHUNK_BYTES == 0 for address, _ in memory.spans)  # each chunk one whole huge page
    assert big.data_ptr() == memory.spans[0][0] and small.data_ptr() == memory.spans[1][0]
    assert huge_page_advice(memory.spans[0]) in ("nh", None)  # first touches in steps: 4 KiB pages
    big[:1000] = torch.arange(1000.0)  # a block in use: its contents must survive
    assert not all(resident_pages(memory.spans[0])) and not any(resident_pages(memory.spans[1]))  # lazy
    calls, more = 0, True
    while more:
        more = memory.prefault_chunk()
        calls += 1
        if calls == 2:  # the first chunk of both regions goes before the second chunk of either
            assert all(resident_pages(memory.spans[0])[:CHUNK_BYTES // mmap.PAGESIZE])
            assert all(resident_pages(memory.spans[1]))
            assert huge_page_advice(memory.spans[0]) in ("hg", None)  # prefaulted chunks: huge pages
        assert calls < 100
    if not memory.fully_prefaulted:
        pytest.skip("the kernel has no MADV_POPULATE_WRITE")
    assert calls == 6  # 3 chunk offsets x 2 regions, the small region done after the first
    assert all(resident_pages(memory.spans[0])) and all(resident_pages(memory.spans[1]))
    assert torch.equal(big[:1000], torch.arange(1000.0)) and torch.count_nonzero(big[1000:]) == 0
    assert not memory.prefault_chunk()


def test_nothing_to_prefault_without_regions():
    memory = CpuKVMemory()
    assert memory.fully_prefaulted and not memory.prefault_chunk()
