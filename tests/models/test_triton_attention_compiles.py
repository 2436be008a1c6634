"""The CUDA attention kernel compiles for real GPUs (sm_80, sm_90) with Triton's bundled toolchain,
no GPU needed: the interpreter, which runs it in the other tests, accepts code the compiler would
refuse (types that differ between branches, dot shapes), so lowering it to a cubin is checked
apart, in a process where the interpreter is off."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

COMPILE = r"""
import json, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kiln.model.layers import triton_attention

kernel = triton.jit(triton_attention._paged_attention_body)
pointers = ["out_ptr", "q_ptr", "k_cache_ptr", "v_cache_ptr"]
ints = ["q_stride_t", "q_stride_h", "out_stride_t", "out_stride_h", "block_table_stride"]
results = []
for dtype, dot, precision, capability, block_q, window in json.loads(sys.argv[1]):
    signature = {name: "*" + dtype for name in pointers}
    signature.update(block_tables_ptr="*i32", seq_lens_ptr="*i32", query_starts_ptr="*i32", scale="fp32")
    signature.update({name: "i32" for name in ints})
    constants = dict(NUM_KV_HEADS=2, GROUP=3, GROUP_PAD=4, HEAD_DIM=64, HEAD_DIM_PAD=64, BLOCK_SIZE=16,
                     BLOCK_Q=block_q, TILE_N=64, SLIDING_WINDOW=window, DOT_DTYPE=getattr(tl, dot),
                     PRECISION=precision)
    signature.update({name: "constexpr" for name in constants})
    names = list(signature)
    source = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32))
    results.append(len(compiled.asm["cubin"]))
print(json.dumps(results))
"""

# (cache dtype, dot dtype, input precision, compute capability, BLOCK_Q, sliding window): decode
# and prefill tiles of a 3-head GQA group, bfloat16 on Hopper, float32 (IEEE dots) on Ampere
VARIANTS = [("bf16", "bfloat16", None, 90, 4, 0), ("bf16", "bfloat16", None, 90, 16, 4096),
            ("fp32", "float32", "ieee", 80, 16, 0)]


def test_the_triton_kernel_compiles_for_gpus():
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("triton with its NVIDIA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, "-c", COMPILE, json.dumps(VARIANTS)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    sizes = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(sizes) == len(VARIANTS) and all(size > 0 for size in sizes)
