"""The native kernels must build on every x86-64 or ARM CPU with a compiler, not only on those with
AVX512-BF16: the kernels that need it are compiled out, the rest (decode attention over the rows
layout, cache writes, the fused elementwise ops) still serve. Every other native test skips when the
build fails, so without this one a build broken on some CPU would pass unnoticed."""

import shutil

import pytest

from kiln.config import env_native_kernels
from kiln.model.layers import native


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler")
@pytest.mark.skipif(not env_native_kernels(), reason="KILN_NATIVE_KERNELS=0")
def test_native_kernels_build_on_this_cpu() -> None:
    assert native.load(), "the native kernels failed to build on this CPU (see the warning logged above)"
    assert native.paged_decode_attention() is not None and native.write_kv_cache() is not None
