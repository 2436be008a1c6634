"""The config and tokenizer of a GGUF file, converted by transformers once per file and machine.

transformers builds both from the file's metadata in Python, token by token: for SmolLM2's 49k
vocabulary 6-11 s for the config and ~11 s for the tokenizer, on every start (two thirds of a
server's launch) and for every engine a test builds. The converted config and tokenizer are saved
under `KILN_CACHE_ROOT`/gguf/<key> with transformers' own `save_pretrained`, and loaded from there
with `from_pretrained` (well under a second), their `name_or_path` set back to the GGUF file's
directory as the conversion had it (error messages name the model, not the cache). The key names the file (path, size, modification
time) and the transformers version, so a changed file or a transformers upgrade converts again.

Entries are written to a temporary directory and renamed into place, so a reader never sees half
of one and two processes converting at once both succeed. A cache that cannot be written (a
read-only home) costs the conversion each time, nothing else.

Each entry records the file it was converted from. Whenever a conversion is stored, entries whose
file is gone or changed are removed, and so are those no process has loaded for `_UNUSED_DAYS`
(another transformers version's, say): the cache holds about one entry per GGUF file in use.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

from kiln.config import env_cache_root
from kiln.logger import init_logger

logger = init_logger(__name__)

_FORMAT_VERSION = 2
_SOURCE_NAME_FILE = "kiln_source_name.txt"
_SOURCE_FILE = "kiln_source.json"
"""The GGUF file an entry came from: {"path", "size", "mtime_ns"}."""
_UNUSED_DAYS = 30


def cached_conversion(gguf_path: str, kind: str, convert: Callable[[], Any], load: Callable[[str], Any]) -> Any:
    """`load(directory)` of the cached `kind` ("config" or "tokenizer") of `gguf_path`, after
    `convert()` and `save_pretrained` into the cache when it is not there yet."""
    root = _entry_root(gguf_path)
    directory = os.path.join(root, kind)
    if os.path.isdir(directory):
        try:
            loaded = load(directory)
            with open(os.path.join(directory, _SOURCE_NAME_FILE)) as source_name:
                loaded.name_or_path = source_name.read()  # where it came from, not the cache
            _touch(root)
            return loaded
        except Exception:  # a damaged entry: convert again, below
            logger.warning("Cached %s of %s is unreadable; converting it again", kind, gguf_path, exc_info=True)
            shutil.rmtree(directory, ignore_errors=True)
    converted = convert()
    _prune(os.path.dirname(root), keep=root)
    _store(directory, converted, gguf_path)
    return converted


def _entry_root(gguf_path: str) -> str:
    import transformers

    path = os.path.abspath(gguf_path)
    stat = os.stat(path)
    identity = f"{_FORMAT_VERSION}|{path}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:24]
    return os.path.join(env_cache_root(), "gguf", f"{os.path.basename(path)}-{digest}")


def _source_identity(gguf_path: str) -> dict[str, Any]:
    path = os.path.abspath(gguf_path)
    stat = os.stat(path)
    return {"path": path, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _touch(root: str) -> None:
    """Mark an entry used now (its directory's modification time), so pruning keeps it."""
    try:
        os.utime(root)
    except OSError:  # read-only cache: it will not be pruned by us either
        pass


def _is_stale(root: str, now: float) -> bool:
    try:
        if now - os.stat(root).st_mtime > _UNUSED_DAYS * 86400:
            return True
        kinds = os.listdir(root)
        if any(kind.startswith(".staging-") for kind in kinds):
            return False  # being written by another process
        sources = [os.path.join(root, kind, _SOURCE_FILE) for kind in kinds]
        for source in sources:
            with open(source) as f:
                recorded = json.load(f)
            if _source_identity(recorded["path"]) != recorded:
                return True
        return not sources
    except (OSError, ValueError, KeyError):  # the file is gone, or an entry of an older format
        return True


def _prune(cache_dir: str, keep: str) -> None:
    """Remove the entries under `cache_dir` other than `keep` that are stale (see the module doc)."""
    if not os.path.isdir(cache_dir):
        return
    now = time.time()
    for name in os.listdir(cache_dir):
        root = os.path.join(cache_dir, name)
        if root != keep and _is_stale(root, now):
            logger.info("Removing the stale GGUF conversion cache entry %s", root)
            shutil.rmtree(root, ignore_errors=True)


def _store(directory: str, converted: Any, gguf_path: str) -> None:
    parent = os.path.dirname(directory)
    try:
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(dir=parent, prefix=".staging-")
        try:
            converted.save_pretrained(staging)
            with open(os.path.join(staging, _SOURCE_NAME_FILE), "w") as source_name:
                source_name.write(getattr(converted, "name_or_path", ""))
            with open(os.path.join(staging, _SOURCE_FILE), "w") as source:
                json.dump(_source_identity(gguf_path), source)
            os.rename(staging, directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    except OSError as exc:
        if not os.path.isdir(directory):  # not another process's entry landing first
            logger.info("Could not cache the conversion in %s (%s); it will be redone next time", parent, exc)
