"""What crosses the pipe between the frontend and the engine core process, and how.

Messages are pickled tuples `(kind, payload)`. Pickle, not a schema codec, because a request
carries objects that have no schema: its SamplingParams, a compiled grammar, a reasoning parser
gating the grammar. Two of those are handled by reference instead of by value:

- the tokenizer (a reasoning parser holds one): 1.5 MB pickled, and the core process loads its own
  copy once, on first need;
- a compiled xgrammar grammar, which does not pickle: it travels as xgrammar's JSON form and is
  rebuilt over the core's own TokenizerInfo. The JSON of a recent grammar is kept, since the same
  constraint tends to repeat (the builtin JSON grammar takes ~15 ms to serialize).
"""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

_TOKENIZER = "tokenizer"
_GRAMMAR = "grammar"
_GRAMMAR_JSON_CACHE_SIZE = 64


def dumps(message: Any) -> bytes:
    """A message with nothing held by reference (the core's side: outputs, stats, replies)."""
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def loads(data: bytes) -> Any:
    return pickle.loads(data)


class RequestEncoder:
    """The frontend's side: pickles messages with its tokenizer and compiled grammars by reference."""

    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer
        self._grammar_json: OrderedDict[int, tuple[Any, str]] = OrderedDict()

    def dumps(self, message: Any) -> bytes:
        buffer = io.BytesIO()
        pickler = pickle.Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL)
        pickler.persistent_id = self._persistent_id  # type: ignore[method-assign]
        pickler.dump(message)
        return buffer.getvalue()

    def _persistent_id(self, obj: Any) -> tuple[str, str] | None:
        if obj is self.tokenizer and obj is not None:
            return (_TOKENIZER, "")
        if type(obj).__name__ == "CompiledGrammar" and type(obj).__module__.startswith("xgrammar"):
            return (_GRAMMAR, self._grammar_as_json(obj))
        return None

    def _grammar_as_json(self, grammar: Any) -> str:
        entry = self._grammar_json.get(id(grammar))
        if entry is not None and entry[0] is grammar:
            self._grammar_json.move_to_end(id(grammar))
            return entry[1]
        text = grammar.serialize_json()
        self._grammar_json[id(grammar)] = (grammar, text)  # holding it keeps its id from being reused
        if len(self._grammar_json) > _GRAMMAR_JSON_CACHE_SIZE:
            self._grammar_json.popitem(last=False)
        return text


class RequestDecoder:
    """The core's side: resolves what RequestEncoder sent by reference, loading the tokenizer (and
    xgrammar's view of it) only when a message first needs it."""

    def __init__(self, vocab_size: int, load_tokenizer: Callable[[], Any]) -> None:
        self.vocab_size = vocab_size
        self._load_tokenizer = load_tokenizer
        self._tokenizer: Any | None = None
        self._tokenizer_info: Any | None = None

    def loads(self, data: bytes) -> Any:
        unpickler = pickle.Unpickler(io.BytesIO(data))
        unpickler.persistent_load = self._persistent_load  # type: ignore[method-assign]
        return unpickler.load()

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = self._load_tokenizer()
        return self._tokenizer

    def _persistent_load(self, pid: tuple[str, str]) -> Any:
        kind, value = pid
        if kind == _TOKENIZER:
            return self.tokenizer
        if kind == _GRAMMAR:
            import xgrammar as xgr

            if self._tokenizer_info is None:
                from kiln.structured.backend import XgrammarBackend

                self._tokenizer_info = XgrammarBackend.tokenizer_info_of(self.tokenizer, self.vocab_size)
            return xgr.CompiledGrammar.deserialize_json(value, self._tokenizer_info)
        raise pickle.UnpicklingError(f"unknown persistent id {kind!r}")
