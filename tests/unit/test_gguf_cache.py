"""The GGUF file's config and tokenizer, converted once and loaded from KILN_CACHE_ROOT afterwards:
the cached ones must be the converted ones (the oracle: transformers' own conversion, done here)."""

from __future__ import annotations

import os

import pytest

from kiln import gguf_cache
from kiln.config import load_hf_config
from kiln.tokenizer import _load_tokenizer

TEXTS = ["Hello, world!", "  leading spaces\tand\ttabs\n\nnewlines", "naïve café — 東京 🚀",
         "<|im_start|>user\nHi<|im_end|>", "def f(x):\n    return x ** 2  # code", ""]


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE_ROOT", str(tmp_path))
    return tmp_path


def _entries(root, kind: str) -> list[str]:
    base = os.path.join(root, "gguf")
    return [e for e in os.listdir(base) if os.path.isdir(os.path.join(base, e, kind))] if os.path.isdir(base) else []


class Converted:
    """A conversion stand-in: text saved to and loaded from a cache entry's directory."""

    def __init__(self, text: str) -> None:
        self.text = text

    def save_pretrained(self, directory: str) -> None:
        with open(os.path.join(directory, "value.txt"), "w") as out:
            out.write(self.text)

    @staticmethod
    def load(directory: str) -> Converted:
        with open(os.path.join(directory, "value.txt")) as f:
            return Converted(f.read())


def test_the_cached_config_is_the_converted_one(cache_root, smollm_path):
    converted = load_hf_config(smollm_path, False, None)
    assert len(_entries(cache_root, "config")) == 1
    cached = load_hf_config(smollm_path, False, None)
    assert cached is not converted
    assert type(cached) is type(converted)
    assert cached.to_dict() == converted.to_dict()
    assert cached.name_or_path == converted.name_or_path


def test_the_cached_tokenizer_is_the_converted_one(cache_root, smollm_path):
    converted = _load_tokenizer.__wrapped__(smollm_path, False, None, "auto", None)
    assert len(_entries(cache_root, "tokenizer")) == 1
    cached = _load_tokenizer.__wrapped__(smollm_path, False, None, "auto", None)
    assert cached is not converted
    assert len(cached) == len(converted)
    assert (cached.bos_token_id, cached.eos_token_id, cached.pad_token_id) == (
        converted.bos_token_id, converted.eos_token_id, converted.pad_token_id)
    assert cached.all_special_tokens == converted.all_special_tokens
    assert cached.chat_template == converted.chat_template
    assert cached.name_or_path == converted.name_or_path
    for text in TEXTS:
        for special in (True, False):
            ids = converted.encode(text, add_special_tokens=special)
            assert cached.encode(text, add_special_tokens=special) == ids
            assert cached.decode(ids) == converted.decode(ids)
            assert cached.decode(ids, skip_special_tokens=True) == converted.decode(ids, skip_special_tokens=True)
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    assert (cached.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
            == converted.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True))


def test_a_changed_file_or_a_damaged_entry_converts_again(cache_root, tmp_path):
    model = tmp_path / "model.gguf"
    model.write_bytes(b"v1")
    conversions = []

    def convert() -> Converted:
        conversions.append(1)
        return Converted(model.read_text())

    assert gguf_cache.cached_conversion(str(model), "thing", convert, Converted.load).text == "v1"
    assert gguf_cache.cached_conversion(str(model), "thing", convert, Converted.load).text == "v1"
    assert len(conversions) == 1
    model.write_bytes(b"v2 longer")  # another size (and modification time): another entry
    assert gguf_cache.cached_conversion(str(model), "thing", convert, Converted.load).text == "v2 longer"
    assert len(conversions) == 2
    (entry,) = [e for e in _entries(cache_root, "thing") if "model.gguf" in e and
                open(os.path.join(cache_root, "gguf", e, "thing", "value.txt")).read() == "v2 longer"]
    os.remove(os.path.join(cache_root, "gguf", entry, "thing", "value.txt"))  # damaged
    assert gguf_cache.cached_conversion(str(model), "thing", convert, Converted.load).text == "v2 longer"
    assert len(conversions) == 3
    assert gguf_cache.cached_conversion(str(model), "thing", convert, Converted.load).text == "v2 longer"
    assert len(conversions) == 3


def test_stale_entries_are_removed_when_a_conversion_is_stored(cache_root, tmp_path, monkeypatch):
    """Storing a conversion removes the entries of files changed or gone and those unused for
    _UNUSED_DAYS; entries of files in use, and the one being stored, stay."""

    def convert(path) -> Converted:
        return gguf_cache.cached_conversion(str(path), "thing", lambda: Converted(path.read_text()), Converted.load)

    files = {name: tmp_path / f"{name}.gguf" for name in ("kept", "changed", "deleted", "unused", "new")}
    for name, path in files.items():
        path.write_bytes(name.encode())
    for name in ("kept", "changed", "deleted", "unused"):
        convert(files[name])
    old_format = os.path.join(cache_root, "gguf", "old.gguf-0123", "thing")
    os.makedirs(old_format)  # written before entries recorded their source
    entries = {e.split(".gguf-")[0]: os.path.join(cache_root, "gguf", e) for e in _entries(cache_root, "thing")}
    files["changed"].write_bytes(b"changed, longer")
    files["deleted"].unlink()
    long_ago = os.stat(entries["unused"]).st_mtime - (gguf_cache._UNUSED_DAYS + 1) * 86400
    os.utime(entries["unused"], (long_ago, long_ago))
    assert sorted(entries) == ["changed", "deleted", "kept", "old", "unused"]
    convert(files["kept"])  # a hit stores nothing, so prunes nothing
    assert len(_entries(cache_root, "thing")) == 5
    assert convert(files["new"]).text == "new"
    assert sorted(e.split(".gguf-")[0] for e in _entries(cache_root, "thing")) == ["kept", "new"]


def test_an_unwritable_cache_still_converts(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("KILN_CACHE_ROOT", str(blocker))
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x")

    class Unsaveable:
        def save_pretrained(self, directory: str) -> None:
            raise AssertionError("never reached: the cache directory cannot be made")

    converted = Unsaveable()
    assert gguf_cache.cached_conversion(str(model), "thing", lambda: converted, lambda d: None) is converted
