"""Memory for CPU KV caches: lazily mapped huge pages, faulted in ahead of use while the engine idles.

Each cache tensor is an anonymous mapping advised onto transparent huge pages. The OS maps zero
pages on first touch, so a 4 GiB cache costs neither seconds of memset at startup nor resident
memory before requests fill it, and attention, which reads tiles scattered over the whole cache,
misses the TLB far less than with 4 KiB pages (measured: 30 layers of 64-sequence decode
attention over scattered blocks, 40-44 ms on huge pages against 45-46 on 4 KiB pages).

The price is the first touch. On the Firecracker VMs this project runs on, faulting in a fresh
2 MiB page costs ~10 ms (the host backs the memory then; 4 KiB pages cost ~1 ms per 2 MiB), and
inside a step every thread waits for it: a cold 64-sequence run of 256 + 128 tokens took ~2.5 s
longer (25 s against 22) than one on a prefaulted cache. So the engine faults the cache in while
it has nothing else to do, 2 MiB at a time (`prefault_chunk`), with MADV_POPULATE_WRITE, which
maps pages without writing them (a block in use keeps its contents). It goes in ascending offset
across all layers, the order in which a fresh block pool hands out blocks, so the memory the next
requests will touch is faulted first. A busy engine never prefaults: there the step would pay
the same faults itself, on both cores.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os

import torch

from kiln.logger import init_logger

logger = init_logger(__name__)

MADV_POPULATE_WRITE = 23  # Linux 5.14+; Python's mmap module does not name it
_libc = ctypes.CDLL(None, use_errno=True)
CHUNK_BYTES = 2 << 20  # one huge page: one prefault call stalls the engine for ~10 ms at most here


class CpuKVMemory:
    """The mappings behind a worker's CPU cache tensors, and a cursor of how far they are faulted in."""

    def __init__(self) -> None:
        self.regions: list[mmap.mmap] = []
        self._addresses: list[int] = []
        self._offset = 0  # the next chunk is [offset, offset + CHUNK_BYTES) of regions[index]
        self._index = 0
        self._done = False

    def zeros(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A zero-filled tensor over a fresh lazily mapped region."""
        num_bytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if num_bytes == 0:
            return torch.zeros(shape, dtype=dtype)
        region = mmap.mmap(-1, num_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            region.madvise(mmap.MADV_HUGEPAGE)
        tensor = torch.frombuffer(region, dtype=torch.uint8)
        self.regions.append(region)
        self._addresses.append(tensor.data_ptr())
        return tensor.view(dtype).view(shape)

    @property
    def fully_prefaulted(self) -> bool:
        return self._done or not self.regions

    def prefault_chunk(self) -> bool:
        """Fault in the next chunk; False once every region is mapped (or the kernel cannot do it)."""
        if self.fully_prefaulted:
            return False
        region = self.regions[self._index]
        if self._offset < len(region):
            # through ctypes, which lets go of the GIL for the ~10 ms the call can take (mmap.madvise
            # holds it, and the server's event loop, even its startup, would wait)
            length = min(CHUNK_BYTES, len(region) - self._offset)
            if _libc.madvise(ctypes.c_void_p(self._addresses[self._index] + self._offset), ctypes.c_size_t(length),
                             MADV_POPULATE_WRITE) != 0:  # e.g. EINVAL before Linux 5.14: pages stay lazily mapped
                logger.info("KV cache memory stays lazily mapped (MADV_POPULATE_WRITE: %s)",
                            os.strerror(ctypes.get_errno()))
                self._done = True
                return False
        self._index += 1
        if self._index == len(self.regions):
            self._index = 0
            self._offset += CHUNK_BYTES
            if self._offset >= max(len(r) for r in self.regions):
                self._done = True
                logger.info("KV cache memory fully faulted in (%.2f GiB)", sum(map(len, self.regions)) / 2**30)
        return not self._done
