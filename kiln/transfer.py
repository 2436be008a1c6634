"""Host-to-device copies that do not wait for the device.

A copy from ordinary (pageable) host memory to a CUDA device first waits for the work already
queued on the stream. With asynchronous scheduling that work is the previous step, so each such
copy would undo the overlap. Staged in pinned memory, the copy queues behind that work instead
(torch's pinned allocator keeps the staging block until the copy has run). On CPU nothing moves.
"""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor` (on the host) on `device`, without a host wait on CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
