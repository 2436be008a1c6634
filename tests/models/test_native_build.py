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


def test_a_build_lock_left_by_a_killed_build_is_removed(tmp_path, caplog) -> None:
    """torch's builder waits forever on a `lock` file that a killed build left; under kiln's flock
    no other kiln process is building, so such a file is stale and goes."""
    (tmp_path / "lock").write_text("")
    with native._exclusive_build(str(tmp_path)):
        assert not (tmp_path / "lock").exists()
    assert "interrupted" in caplog.text


def test_builds_in_one_directory_take_turns(tmp_path) -> None:
    import threading

    entered = threading.Event()

    def second() -> None:
        with native._exclusive_build(str(tmp_path)):
            entered.set()

    with native._exclusive_build(str(tmp_path)):
        thread = threading.Thread(target=second)
        thread.start()
        assert not entered.wait(0.3), "a second builder entered while the first held the directory"
    assert entered.wait(10)
    thread.join()
