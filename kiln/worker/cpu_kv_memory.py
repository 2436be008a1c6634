"""Memory for CPU KV caches: lazily mapped, faulted in ahead of use onto huge pages while the engine idles.

Each cache tensor is an anonymous mapping. The OS maps zero pages on first touch, so a 4 GiB cache
costs neither seconds of memset at startup nor resident memory before requests fill it.

Two page sizes, for two kinds of first touch:
- The engine faults the cache in while it has nothing else to do (`prefault_chunk`), 2 MiB at a
  time: it advises the chunk onto transparent huge pages, then maps it with MADV_POPULATE_WRITE,
  which keeps contents (a block in use stays as it is). Attention reads tiles scattered over the
  whole cache and misses the TLB far less on huge pages (measured: 30 layers of 64-sequence decode
  attention over scattered blocks, 40-44 ms on huge pages against 45-46 on 4 KiB pages). It goes
  in ascending offset across all layers, the order in which a fresh block pool hands out blocks,
  so the memory the next requests will touch is faulted first. A busy engine never prefaults:
  the step would pay the same faults itself, on both cores.
- Memory a step touches before the prefaulter got there (an offline `LLM` run has no idle time; a
  server busy from its start) faults in 4 KiB pages. On the Firecracker VMs this project runs on,
  a first touch costs the host's backing of the memory, and that runs 4-5x faster per byte in
  4 KiB pages than in 2 MiB ones (measured: 1.9-2.2 against 0.4-0.6 GB/s), while every thread of
  the step waits for it. So the mapping starts advised *off* huge pages, and only the prefaulter
  turns them on, chunk by chunk.

Mappings are aligned to 2 MiB, so that every prefaulted chunk is one whole huge page.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os

import torch

from kiln.logger import init_logger

logger = init_logger(__name__)

MADV_HUGEPAGE, MADV_NOHUGEPAGE = 14, 15
MADV_POPULATE_WRITE = 23  # Linux 5.14+; Python's mmap module does not name it
_libc = ctypes.CDLL(None, use_errno=True)
CHUNK_BYTES = 2 << 20  # one huge page: one prefault call stalls the engine for ~10 ms at most here


def _madvise(address: int, length: int, advice: int) -> bool:
    """madvise(2) through ctypes, which lets go of the GIL for the ~10 ms a populate can take
    (mmap.madvise holds it, and the server's event loop, even its startup, would wait)."""
    return _libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), advice) == 0


class CpuKVMemory:
    """The mappings behind a worker's CPU cache tensors, and a cursor of how far they are faulted in."""

    def __init__(self) -> None:
        self.regions: list[mmap.mmap] = []  # kept alive for the tensors viewing them
        self.spans: list[tuple[int, int]] = []  # (2 MiB-aligned address, bytes) of each tensor's memory
        self._offset = 0  # the next chunk is [offset, offset + CHUNK_BYTES) of spans[index]
        self._index = 0
        self._done = False

    def zeros(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A zero-filled tensor over a fresh lazily mapped region (4 KiB pages until prefaulted)."""
        num_bytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if num_bytes == 0:
            return torch.zeros(shape, dtype=dtype)
        region = mmap.mmap(-1, num_bytes + CHUNK_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        base = torch.frombuffer(region, dtype=torch.uint8)
        skip = -base.data_ptr() % CHUNK_BYTES
        tensor = base[skip:skip + num_bytes]
        _madvise(tensor.data_ptr(), num_bytes, MADV_NOHUGEPAGE)  # THP "always" would fault 2 MiB pages
        self.regions.append(region)
        self.spans.append((tensor.data_ptr(), num_bytes))
        return tensor.view(dtype).view(shape)

    @property
    def fully_prefaulted(self) -> bool:
        return self._done or not self.spans

    def prefault_chunk(self) -> bool:
        """Fault in the next chunk onto a huge page; False once every region is mapped (or the
        kernel cannot do it)."""
        if self.fully_prefaulted:
            return False
        address, num_bytes = self.spans[self._index]
        if self._offset < num_bytes:
            start, length = address + self._offset, min(CHUNK_BYTES, num_bytes - self._offset)
            _madvise(start, length, MADV_HUGEPAGE)  # refused without THP: the populate still maps 4 KiB pages
            if not _madvise(start, length, MADV_POPULATE_WRITE):  # e.g. EINVAL before Linux 5.14: pages stay lazy
                logger.info("KV cache memory stays lazily mapped (MADV_POPULATE_WRITE: %s)",
                            os.strerror(ctypes.get_errno()))
                self._done = True
                return False
        self._index += 1
        if self._index == len(self.spans):
            self._index = 0
            self._offset += CHUNK_BYTES
            if self._offset >= max(length for _, length in self.spans):
                self._done = True
                logger.info("KV cache memory fully faulted in (%.2f GiB)", sum(n for _, n in self.spans) / 2**30)
        return not self._done
