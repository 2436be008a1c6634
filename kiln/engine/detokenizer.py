"""Incremental detokenization and stop strings, one `IncrementalDetokenizer` per sample.

Owned by the output processor, which feeds it each step's new token ids. It turns ids into text
without re-decoding the whole output, cuts the text at stop strings, and withholds the tail a
stop string could still complete. It never touches the scheduler or the KV cache: a stop-string
hit is reported back, and the output processor asks the core to finish the request.

Decoding keeps a short window of ids (vLLM's prefix/read offsets, as in `tokenizers`'
`DecodeStream`):

    ids:   ... | prefix (already emitted) | pending (not yet emitted) |
                 ^ window start             ^ _read_offset           ^ len(_ids)

Each new id is decoded together with the prefix, and the text past the prefix's own decoding is
new. Decoding in context keeps leading spaces right for SentencePiece-style decoders (which
strip the first token's space) and lets byte-level BPE wait for the rest of a character split
over tokens: a window whose text ends in U+FFFD is held until a later id completes it. The
window starts as the prompt's last few ids, so the first output token is decoded in context.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from kiln.logger import init_logger

logger = init_logger(__name__)

# Prompt ids kept as decoding context for the first output token (vLLM uses the same 5).
_PROMPT_CONTEXT_TOKENS = 5
# Pending ids past which text is emitted even if it ends in U+FFFD; no UTF-8 character needs
# this many tokens, so only invalid byte streams (e.g. a random model) ever get here.
_MAX_PENDING_TOKENS = 32
_REPLACEMENT_CHAR = "\ufffd"

_special_ids_cache: weakref.WeakKeyDictionary[Any, frozenset[int]] = weakref.WeakKeyDictionary()


def _special_ids(tokenizer: Any) -> frozenset[int]:
    """The ids `tokenizer.decode(..., skip_special_tokens=True)` drops."""
    try:
        return _special_ids_cache[tokenizer]
    except (KeyError, TypeError):
        pass
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the Rust decoder skips added tokens flagged special
        ids = frozenset(i for i, tok in backend.get_added_tokens_decoder().items() if tok.special)
    else:
        ids = frozenset(getattr(tokenizer, "all_special_ids", ()) or ())
    try:
        _special_ids_cache[tokenizer] = ids
    except TypeError:
        pass
    return ids


def _decode_fn(tokenizer: Any, skip_special_tokens: bool,
               spaces_between_special_tokens: bool) -> Callable[[list[int]], str]:
    """`tokenizer.decode` with the request's options and no clean-up of tokenization spaces."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # fast tokenizer: call Rust directly, as tokenizer.decode does
        return functools.partial(backend.decode, skip_special_tokens=skip_special_tokens)
    return functools.partial(
        tokenizer.decode, skip_special_tokens=skip_special_tokens,
        spaces_between_special_tokens=spaces_between_special_tokens, clean_up_tokenization_spaces=False,
    )


_single_texts_cache: weakref.WeakKeyDictionary[Any, dict[tuple[bool, bool], dict[int, str]]] = (
    weakref.WeakKeyDictionary())


def _single_texts(tokenizer: Any, skip_special_tokens: bool, spaces_between_special_tokens: bool) -> dict[int, str]:
    """A cache, shared by every sample with these options, of one id's text decoded on its own:
    after each emitted token the window is usually that one id, so its decoding repeats across
    samples and steps (a second tokenizer call per token without it). Uncacheable tokenizers get
    a private dict."""
    try:
        per_tokenizer = _single_texts_cache.setdefault(tokenizer, {})
    except TypeError:
        return {}
    return per_tokenizer.setdefault((skip_special_tokens, spaces_between_special_tokens), {})


@functools.lru_cache(maxsize=1 << 17)
def decode_token(tokenizer: Any, token_id: int) -> str:
    """The text of one token on its own, as logprobs show it (a partial character reads U+FFFD)."""
    token = tokenizer.convert_ids_to_tokens(token_id)
    if token is None:  # id outside the vocabulary
        return ""
    return tokenizer.convert_tokens_to_string([token])


class IncrementalDetokenizer:
    """Text of one sample, decoded as its tokens arrive, cut at the first stop string.

    Invariants: `output_text` only grows until a stop string matches; after that `update` is a
    no-op. Text handed out by `get_next_output_text(finished=False, ...)` is never later cut by a
    stop string when `include_stop_str_in_output` is false. Decoding work per token is bounded
    by the window size, not the output length.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int], params: Any) -> None:
        skip_special_tokens = bool(getattr(params, "skip_special_tokens", True))
        spaces_between_special_tokens = bool(getattr(params, "spaces_between_special_tokens", True))
        self._decode = _decode_fn(tokenizer, skip_special_tokens, spaces_between_special_tokens)
        self._single_texts = _single_texts(tokenizer, skip_special_tokens, spaces_between_special_tokens)
        self._skip_ids = _special_ids(tokenizer) if skip_special_tokens else frozenset()
        stop = getattr(params, "stop", None) or []
        self.stop: list[str] = [s for s in ([stop] if isinstance(stop, str) else stop) if s]
        self.include_stop_str_in_output = bool(getattr(params, "include_stop_str_in_output", False))
        self._max_stop_len = max((len(s) for s in self.stop), default=0)
        # Characters withheld from unfinished output: the longest partial stop string.
        self._num_held = self._max_stop_len - 1 if self.stop and not self.include_stop_str_in_output else 0
        self.stop_reason: str | None = None  # the stop string that matched, once one has

        context = [t for t in prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:] if t not in self._skip_ids]
        prefix_text = self._decode(context) if context else ""
        if prefix_text.endswith(_REPLACEMENT_CHAR):  # prompt ends mid-character: decode without it
            context, prefix_text = [], ""
        self._ids: list[int] = context
        self._read_offset = len(context)
        self._prefix_text = prefix_text

        # The text is kept as chunks so that appending and delta reads stay O(new text).
        self._chunks: list[str] = []
        self._num_chars = 0
        self._num_returned = 0  # characters handed out by delta reads
        self._tail = ""  # the last (longest stop string - 1) characters, for straddling matches

    @property
    def output_text(self) -> str:
        """All text decoded so far (cut at the stop string once one matched)."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    def update(self, new_token_ids: Sequence[int], stop_terminated: bool) -> str | None:
        """Decode `new_token_ids`, then look for stop strings in the new text; return the one matched.

        stop_terminated: the last id is a stop token (EOS or a stop_token_ids hit); its text is
        left out unless include_stop_str_in_output.
        """
        if self.stop_reason is not None:
            return None
        if stop_terminated and not self.include_stop_str_in_output:
            new_token_ids = new_token_ids[:-1]
        new_text = "".join([self._decode_next(token_id) for token_id in new_token_ids])
        return self._append(new_text) if new_text else None

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """The text not returned by earlier delta calls (delta) or all of it; unfinished output
        withholds the characters a stop string could still claim."""
        length = self._num_chars if finished else max(self._num_chars - self._num_held, 0)
        if not delta:
            return self.output_text[:length]
        start = self._num_returned
        if length <= start:
            return ""
        self._num_returned = length
        return self._slice_tail(start, length)

    def _decode_next(self, token_id: int) -> str:
        """Add one id to the window; return the text it completes ("" while a character is partial)."""
        if token_id in self._skip_ids:
            return ""
        ids = self._ids
        ids.append(token_id)
        text = self._decode(ids)
        prefix_text = self._prefix_text
        if len(text) <= len(prefix_text) or text.endswith(_REPLACEMENT_CHAR):
            if len(ids) - self._read_offset < _MAX_PENDING_TOKENS:
                return ""
        new_text = text[len(prefix_text):]
        # The pending ids become the next prefix.
        del ids[: self._read_offset]
        self._read_offset = len(ids)
        if len(ids) == 1:
            prefix_text = self._single_texts.get(ids[0])
            if prefix_text is None:
                prefix_text = self._single_texts[ids[0]] = self._decode(ids)
            self._prefix_text = prefix_text
        else:
            self._prefix_text = self._decode(ids)
        return new_text

    def _append(self, new_text: str) -> str | None:
        num_before = self._num_chars
        self._chunks.append(new_text)
        self._num_chars += len(new_text)
        if not self.stop:
            return None
        # Search only matches that end inside the new text; earlier ones were checked before.
        tail = self._tail + new_text
        best: tuple[int, int, str] | None = None  # (end, start, stop string)
        for stop in self.stop:
            start = tail.find(stop, max(len(self._tail) - len(stop) + 1, 0))
            if start != -1 and (best is None or (start + len(stop), start) < best[:2]):
                best = (start + len(stop), start, stop)
        if best is None:
            self._tail = tail[-(self._max_stop_len - 1):] if self._max_stop_len > 1 else ""
            return None
        end, start, stop = best
        cut = num_before - len(self._tail) + (end if self.include_stop_str_in_output else start)
        text = self.output_text[:cut]
        self._chunks = [text] if text else []
        self._num_chars = len(text)
        self._num_returned = min(self._num_returned, len(text))
        self.stop_reason = stop
        return stop

    def _slice_tail(self, start: int, end: int) -> str:
        """output_text[start:end] for a span near the end, joining only the chunks it covers."""
        pieces: list[str] = []
        chunk_end = self._num_chars
        chunk_start = chunk_end
        for chunk in reversed(self._chunks):
            chunk_start = chunk_end - len(chunk)
            pieces.append(chunk)
            if chunk_start <= start:
                break
            chunk_end = chunk_start
        joined = "".join(reversed(pieces))
        return joined[start - chunk_start: end - chunk_start]
