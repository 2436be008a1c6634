"""Small C++ kernels for CPU, compiled once per machine with torch's extension builder.

Built on first use (about 15 s with g++ and ninja; the worker triggers it at startup, so it counts
in startup time) into `KILN_CACHE_ROOT`/native/<torch version>-<CPU flags hash>, and reloaded from
there by later processes. Where no compiler is at hand, the build fails or `KILN_NATIVE_KERNELS=0`
is set, every caller keeps its torch implementation: the kernels are a speed-up, never a requirement.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import platform
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kiln.config import env_cache_root, env_native_kernels
from kiln.logger import init_logger

logger = init_logger(__name__)

_SOURCES = [Path(__file__).with_name(name)
            for name in ("paged_attention.cpp", "prefill_attention.cpp", "prefill_attention_rows.cpp",
                         "elementwise.cpp", "sampling.cpp", "cache_write.cpp", "pair_packed_linear.cpp",
                         "decoder_stack.cpp")]
# -fopenmp: ATen's parallel_for is inline OpenMP, serial without it; the math flags let the compiler
# reassociate reductions (no -ffinite-math-only: the kernels rely on -inf)
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math",
           "-ffp-contract=fast"]
_lock = threading.Lock()


def _build_dir() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    digest = hashlib.sha256(flags.encode()).hexdigest()[:12]
    path = os.path.join(env_cache_root(), "native", f"torch{torch.__version__}-{platform.machine()}-{digest}")
    os.makedirs(path, exist_ok=True)
    return path


@dataclass(frozen=True)
class _Kernels:
    """The ops resolved once, so the per-layer calls on the hot path do no lookups or dispatches."""

    paged_decode_attention: Callable[..., torch.Tensor]
    write_kv_cache: Callable[..., None]
    paged_prefill_attention: Callable[..., torch.Tensor] | None  # None on CPUs without AVX512-BF16 (as the pairs layout)
    paged_prefill_attention_rows: Callable[..., torch.Tensor] | None  # None on CPUs without AVX2, FMA and F16C
    pair_packed_linear: Callable[..., torch.Tensor] | None  # None on CPUs with neither AVX512-BF16 nor AVX2
    pair_packed_silu_gate_up: Callable[..., torch.Tensor] | None  # as pair_packed_linear
    decoder_stack: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None  # needs pair_packed_linear
    ops: Any  # torch.ops.kiln_native, for the fused elementwise kernels


_kernels: _Kernels | None = None
_resolved = False


def load() -> bool:
    """Build or load the kernels into `torch.ops.kiln_native`; False (logged once) where unavailable."""
    global _kernels, _resolved
    if not _resolved:
        with _lock:
            if not _resolved:
                if _load():
                    ops = torch.ops.kiln_native
                    linear = ops.pair_packed_linear_available()
                    _kernels = _Kernels(
                        ops.paged_decode_attention, ops.write_kv_cache,
                        ops.paged_prefill_attention if ops.paged_prefill_attention_available() else None,
                        ops.paged_prefill_attention_rows if ops.paged_prefill_attention_rows_available() else None,
                        ops.pair_packed_linear if linear else None, ops.pair_packed_silu_gate_up if linear else None,
                        ops.decoder_stack if linear else None, ops)
                _resolved = True
    return _kernels is not None


def _load() -> bool:
    if not env_native_kernels():
        logger.info("Native CPU kernels off (KILN_NATIVE_KERNELS=0)")
        return False
    from torch.utils.cpp_extension import load as build

    if shutil.which("ninja") is None:  # the pip-installed ninja sits beside this interpreter
        os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    start = time.perf_counter()
    build_dir = _build_dir()
    try:
        with _exclusive_build(build_dir):
            build(name="kiln_native", sources=[str(s) for s in _SOURCES], is_python_module=False,
                  extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"], build_directory=build_dir, verbose=False)
    except Exception as exc:  # no compiler, no ninja, a failed build: keep the torch paths
        lines = str(exc).splitlines()
        reason = next((line for line in lines if "error" in line.lower() and line is not lines[0]), lines[0] if lines else "")
        logger.warning("Native CPU kernels unavailable, using the torch paths: %s", reason[:500])
        return False
    logger.info("Native CPU kernels ready in %.1f s", time.perf_counter() - start)
    return True


@contextlib.contextmanager
def _exclusive_build(build_dir: str) -> Iterator[None]:
    """One kiln process at a time loads or builds in `build_dir`, under an flock that dies with
    its holder. torch's builder guards the directory with a plain `lock` file instead, which a
    process killed mid-build leaves behind, and every later load then waits on it forever (even
    with nothing to rebuild). Holding the flock, any `lock` file found is such a leftover."""
    with open(os.path.join(build_dir, "kiln-build.flock"), "w") as guard:  # closing it unlocks
        fcntl.flock(guard, fcntl.LOCK_EX)
        stale = os.path.join(build_dir, "lock")
        if os.path.exists(stale):
            logger.warning("Removing %s, left by a native kernel build that was interrupted", stale)
            os.remove(stale)
        yield


def pair_packed_linear() -> Callable[..., torch.Tensor] | None:
    """x [M, K] @ W^T (+ bias) in bfloat16 with W from `pack_weight_pairs` (see pair_packed_linear.cpp),
    or None where it is unavailable (no kernels, or a CPU with neither AVX512-BF16 nor AVX2 and FMA)."""
    return _kernels.pair_packed_linear if load() else None  # type: ignore[union-attr]


def pair_packed_silu_gate_up() -> Callable[..., torch.Tensor] | None:
    """silu(gate) * up straight from x and a pair-packed [2I, K] gate | up weight (I a multiple of
    16; see pair_packed_linear.cpp), bitwise silu_and_mul(pair_packed_linear(...)); None where the
    pair-packed kernels are unavailable."""
    return _kernels.pair_packed_silu_gate_up if load() else None  # type: ignore[union-attr]


def decoder_stack() -> Callable[..., tuple[torch.Tensor, torch.Tensor]] | None:
    """Decoder layers chained in one call (see decoder_stack.cpp and model/native_stack.py), or None
    where it is unavailable (as pair_packed_linear)."""
    return _kernels.decoder_stack if load() else None  # type: ignore[union-attr]


def pack_weight_pairs(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] bfloat16 -> the key-pair layout `pair_packed_linear` reads (needs the kernels)."""
    assert _kernels is not None, "the native kernels are not loaded"
    return _kernels.ops.pack_weight_pairs(weight)


def fused_bf16_ops(x: torch.Tensor) -> Any | None:
    """`torch.ops.kiln_native` when `x` may take the fused bfloat16 elementwise kernels
    (elementwise.cpp: add_rms_norm, silu_and_mul, rotary), else None."""
    if x.dtype != torch.bfloat16 or x.device.type != "cpu" or not load():
        return None
    return _kernels.ops  # type: ignore[union-attr]


def argmax_rows(logits: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The row argmax (sampling.cpp) when `logits` is bfloat16 or float32 on CPU, else None."""
    if logits.dtype not in (torch.bfloat16, torch.float32) or logits.device.type != "cpu" or not load():
        return None
    return _kernels.ops.argmax_rows  # type: ignore[union-attr]


def min_p_rows(logits: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], None] | None:
    """The sampler's in-place min-p filter (sampling.cpp) when `logits` is contiguous float32 on CPU,
    else None."""
    if logits.dtype != torch.float32 or logits.device.type != "cpu" or not logits.is_contiguous() or not load():
        return None
    return _kernels.ops.min_p_rows  # type: ignore[union-attr]


def logprobs_rows(logits: torch.Tensor) -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None:
    """The logprobs of chosen tokens and the top k straight from raw logits (sampling.cpp) when
    `logits` is bfloat16 or float32 on CPU, else None."""
    if logits.dtype not in (torch.bfloat16, torch.float32) or logits.device.type != "cpu" or not load():
        return None
    return _kernels.ops.logprobs_rows  # type: ignore[union-attr]


def softmax_draw_rows(logits: torch.Tensor) -> Callable[..., torch.Tensor] | None:
    """The sampler's draw from softmax(logits) (sampling.cpp) when `logits` is float32 on CPU, else None."""
    if logits.dtype != torch.float32 or logits.device.type != "cpu" or not load():
        return None
    return _kernels.ops.softmax_draw_rows  # type: ignore[union-attr]


def top_k_top_p_rows(logits: torch.Tensor) -> Callable[..., None] | None:
    """The sampler's in-place top-k / top-p filter (sampling.cpp) when `logits` is contiguous float32
    on CPU, else None."""
    if logits.dtype != torch.float32 or logits.device.type != "cpu" or not logits.is_contiguous() or not load():
        return None
    return _kernels.ops.top_k_top_p_rows  # type: ignore[union-attr]


def paged_decode_attention() -> Callable[..., torch.Tensor] | None:
    """The decode-attention kernel (see paged_attention.cpp), or None where it is unavailable."""
    return _kernels.paged_decode_attention if load() else None  # type: ignore[union-attr]


def write_kv_cache() -> Callable[..., None] | None:
    """The KV cache write (see cache_write.cpp), or None where the kernels are unavailable."""
    return _kernels.write_kv_cache if load() else None  # type: ignore[union-attr]


def pairs_layout_available() -> bool:
    """Whether the kernels that read and write the pairs KV cache layout (kv_layout.py) run here
    (they need AVX512-BF16)."""
    return load() and _kernels.paged_prefill_attention is not None  # type: ignore[union-attr]


def paged_prefill_attention() -> Callable[..., torch.Tensor] | None:
    """The bfloat16 prefill-attention kernel over pairs-layout caches (see prefill_attention.cpp), or
    None where it is unavailable (no kernels, or a CPU without AVX512-BF16)."""
    return _kernels.paged_prefill_attention if load() else None  # type: ignore[union-attr]


def paged_prefill_attention_rows() -> Callable[..., torch.Tensor] | None:
    """The prefill-attention kernel for bfloat16 queries over rows-layout bfloat16 or fp8 caches of 16-key
    blocks (see prefill_attention_rows.cpp), or None where it is unavailable (no kernels, or a CPU
    without AVX2, FMA and F16C)."""
    return _kernels.paged_prefill_attention_rows if load() else None  # type: ignore[union-attr]
