"""`KILN_TORCH_PROFILER_DIR`: torch profiler traces of engine steps, started and stopped on demand
(vLLM's VLLM_TORCH_PROFILER_DIR: `LLM.start_profile()` / `stop_profile()`, and the server's
POST /start_profile and /stop_profile, which exist only while the variable is set).

Each start..stop span becomes one Chrome/TensorBoard trace file in that directory.
"""

from __future__ import annotations

import os

import torch

from kiln.config import env_torch_profiler_dir
from kiln.errors import InvalidRequestError
from kiln.logger import init_logger

logger = init_logger(__name__)


class StepProfiler:
    def __init__(self) -> None:
        self.trace_dir = env_torch_profiler_dir()
        self._profile: torch.profiler.profile | None = None

    def start(self) -> None:
        if self.trace_dir is None:
            raise InvalidRequestError("Profiling is off: set KILN_TORCH_PROFILER_DIR to a directory for the traces.")
        if self._profile is not None:
            raise InvalidRequestError("The profiler is already running.")
        os.makedirs(self.trace_dir, exist_ok=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._profile = torch.profiler.profile(
            activities=activities, record_shapes=True,
            on_trace_ready=torch.profiler.tensorboard_trace_handler(self.trace_dir, worker_name="kiln"),
        )
        self._profile.start()
        logger.info("Torch profiler started; traces go to %s", self.trace_dir)

    def stop(self) -> None:
        if self._profile is None:
            raise InvalidRequestError("The profiler is not running.")
        profile, self._profile = self._profile, None
        profile.stop()
        logger.info("Torch profiler stopped; trace written to %s", self.trace_dir)
