"""The worker: owns the device, the model weights and the paged KV cache.

It sizes the KV cache (a byte budget where one is given, always on CPU; else on CUDA what a
profiled forward leaves of `gpu_memory_utilization`; `num_gpu_blocks_override` wins over both), allocates it, binds each
attention layer to its K/V tensors, captures the decode CUDA graphs (worker/cuda_graphs.py), and
hands steps to the model runner.
"""

from __future__ import annotations

import time

import torch

from kiln.config import EngineConfig
from kiln.core.outputs import ModelRunnerOutput
from kiln.core.sched_output import SchedulerOutput
from kiln.errors import InvalidRequestError
from kiln.logger import init_logger
from kiln.model.layers.attention import Attention
from kiln.model.layers import native
from kiln.model.layers.cpu_gemm import pack_model_weights
from kiln.model.loader import load_model
from kiln.worker import cuda_graphs
from kiln.worker.cpu_kv_memory import CpuKVMemory
from kiln.worker.model_runner import LaunchedStep, ModelRunner

logger = init_logger(__name__)


class Worker:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = torch.device(config.device_config.device)
        torch.manual_seed(config.model_config.seed)
        start = time.perf_counter()
        self.model = load_model(config.model_config, config.load_config, str(self.device))
        if self.device.type == "cpu":
            native.load()  # build (first run on this machine) or load the CPU kernels now, not mid-request
        num_packed = pack_model_weights(self.model)
        if num_packed:
            logger.info("Packed %d bfloat16 weight matrices (see model/layers/cpu_gemm.py)", num_packed)
        self.load_seconds = time.perf_counter() - start
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.model_runner = ModelRunner(config, self.model, self.device)
        self.num_blocks = self._determine_num_blocks()
        graph_sizes = self.config.model_config.cuda_graph_sizes
        use_graphs = bool(graph_sizes) and cuda_graphs.supported(self.device)
        if graph_sizes and self.device.type == "cuda" and not use_graphs:
            logger.warning("CUDA graphs need the Triton attention kernel (is triton installed?): decoding eagerly.")
        # graphs pad decode batches with rows that write a spare block past the pool
        self._allocate_kv_cache(self.num_blocks, spare_blocks=int(use_graphs))
        if use_graphs:
            self._capture_decode_graphs(graph_sizes)

    @property
    def kv_cache_dtype(self) -> torch.dtype:
        return self.config.cache_config.kv_torch_dtype(self.config.model_config.torch_dtype)

    def _bytes_per_block(self) -> int:
        mc = self.config.model_config
        element_size = torch.empty((), dtype=self.kv_cache_dtype).element_size()
        per_layer = 2 * self.config.cache_config.block_size * mc.num_kv_heads * mc.head_dim * element_size
        return per_layer * len(self.attn_layers)

    def _determine_num_blocks(self) -> int:
        cache = self.config.cache_config
        if cache.num_gpu_blocks_override is not None:
            num_blocks = cache.num_gpu_blocks_override
        elif cache.kv_cache_memory_bytes is not None:
            num_blocks = cache.kv_cache_memory_bytes // self._bytes_per_block()
        else:
            assert self.device.type == "cuda", "CPU needs a KV cache byte budget"
            num_blocks = self._profile_cuda_blocks()
        capacity = int(num_blocks) * cache.block_size
        max_model_len = self.config.model_config.max_model_len
        if capacity < max_model_len:
            raise InvalidRequestError(
                f"The KV cache holds {capacity} tokens ({num_blocks} blocks), fewer than max_model_len="
                f"{max_model_len}: one long request could never run. Give the cache more memory "
                "(kv_cache_memory / KILN_CPU_KVCACHE_SPACE, gpu_memory_utilization) or lower max_model_len."
            )
        return int(num_blocks)

    def _profile_cuda_blocks(self) -> int:
        """Run a forward at the full token budget and a full step of sampling, then give the KV cache
        what is left."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        free, total = torch.cuda.mem_get_info()
        weights = torch.cuda.memory_allocated()
        num_tokens = self.model_runner.profile_run(self._allocate_kv_cache)
        activations = torch.cuda.max_memory_allocated() - weights
        torch.cuda.empty_cache()  # the profile's blocks go back to the driver, for the KV cache to take
        logger.info("Profiled a %d-token forward and sampler: %.2f GiB of activations", num_tokens, activations / 2**30)
        used_by_others = total - free
        budget = total * self.config.cache_config.gpu_memory_utilization - used_by_others - activations
        return max(0, int(budget // self._bytes_per_block()))

    def _capture_decode_graphs(self, sizes: tuple[int, ...]) -> None:
        block_size = self.config.cache_config.block_size
        graphs = cuda_graphs.DecodeGraphs(
            self.model, sizes, max_blocks_per_seq=-(-self.config.model_config.max_model_len // block_size),
            pad_block=self.num_blocks, block_size=block_size, device=self.device,
            new_graph=cuda_graphs.graph_factory(),
        )
        graphs.capture()
        self.model_runner.decode_graphs = graphs

    def _allocate_kv_cache(self, num_blocks: int, spare_blocks: int = 0) -> None:
        mc, cache = self.config.model_config, self.config.cache_config
        # see model/layers/attention.py
        shape = (num_blocks + spare_blocks, mc.num_kv_heads, cache.block_size, mc.head_dim)
        self.kv_memory = CpuKVMemory()
        for layer in self.attn_layers:
            layer.kv_cache = (self._zeros(shape, self.kv_cache_dtype), self._zeros(shape, self.kv_cache_dtype))
        num_tokens = num_blocks * cache.block_size
        logger.info(
            "KV cache: %d blocks of %d tokens (%d tokens, %.2f GiB, %s); maximum concurrency at %d tokens "
            "per request: %.2fx",
            num_blocks, cache.block_size, num_tokens, num_blocks * self._bytes_per_block() / 2**30,
            str(self.kv_cache_dtype).removeprefix("torch."),
            mc.max_model_len, num_tokens / mc.max_model_len,
        )

    def _zeros(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if self.device.type == "cpu":
            return self.kv_memory.zeros(shape, dtype)  # lazily mapped; see cpu_kv_memory
        return torch.zeros(shape, dtype=dtype, device=self.device)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.model_runner.execute_model(scheduler_output)

    def launch_step(self, scheduler_output: SchedulerOutput) -> LaunchedStep:
        """Queue a step without reading its tokens back (asynchronous scheduling)."""
        return self.model_runner.launch(scheduler_output)

    def prefault_kv_cache_chunk(self) -> bool:
        """Idle work: fault in the next chunk of CPU KV cache memory; False when none is left."""
        return self.kv_memory.prefault_chunk()
