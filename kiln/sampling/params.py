"""SamplingParams: how one request wants its tokens chosen, with vLLM's field names and rules.

Pure Python (the scheduler and the HTTP layer import it): no torch here. Every bad value raises
`InvalidRequestError` naming the field, the value and the accepted range, at construction, so a
request that reaches the engine is valid. Checks that need the model (vocabulary size, the
`--max-logprobs` limit, the tokenizer for `bad_words`) are the methods `verify_logprobs`,
`verify_token_ids` and `update_from_tokenizer`, called by the frontend once the model is known.
"""

from __future__ import annotations

import copy
import enum
import math
from dataclasses import dataclass, field
from typing import Any, Protocol

from kiln.errors import InvalidRequestError
from kiln.logger import init_logger
from kiln.structured.params import StructuredOutputsParams

logger = init_logger(__name__)

SAMPLING_EPS = 1e-5
"""A temperature below this is greedy decoding."""
MIN_TEMPERATURE = 1e-2
"""Positive temperatures below this are raised to it (as vLLM does): lower ones overflow in float32."""
MAX_LOGIT_BIAS = 100.0


class SamplingType(enum.IntEnum):
    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


class _Encoder(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> Any: ...


def _fail(param: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(message, param=param)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require_int(name: str, value: object) -> None:
    if not _is_int(value):
        raise _fail(name, f"{name} must be an integer, got {value!r}.")


def _require_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(name, f"{name} must be a finite number, got {value!r}.")


@dataclass
class SamplingParams:
    """Sampling settings of one request; the defaults leave the model's distribution untouched.

    Invariants after construction: `stop` and `stop_token_ids` are lists (possibly empty),
    `logit_bias` has int keys and values clamped to [-100, 100], and a greedy request
    (temperature 0) has top_p=1, top_k=0 and min_p=0.
    """

    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 or -1 disables top-k."""
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    """None: up to the context limit, resolved by the engine."""
    min_tokens: int = 0
    logprobs: int | None = None
    """Top logprobs to return per output token (the sampled token always comes too); -1: whole vocabulary."""
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    truncate_prompt_tokens: int | None = None
    """Keep only the last k prompt tokens; -1: the model's context limit."""
    extra_args: dict[str, Any] | None = None
    structured_outputs: StructuredOutputsParams | dict[str, Any] | None = None
    """Constrain the output to a JSON schema, regex, choice or grammar (a dict is converted)."""
    _bad_words_token_ids: list[list[int]] | None = field(default=None, init=False, repr=False, compare=False)
    compiled_grammar: Any = field(default=None, init=False, repr=False, compare=False)
    """The backend's compiled form of `structured_outputs`, set by the input processor."""
    reasoning_gate: Any = field(default=None, init=False, repr=False, compare=False)
    """Set by the chat server when a reasoning parser is on: an object with `is_reasoning_end(ids)` and
    `extract_content_ids(ids)` (a ReasoningParser); the constraint then starts after the thinking part."""

    def __post_init__(self) -> None:
        self._normalize()
        self._verify_args()
        if self.temperature < SAMPLING_EPS:
            # Greedy: the filters cannot change the argmax, so make them neutral.
            # n > 1 is allowed (the OpenAI API allows it): the samples are then identical.
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0

    def _normalize(self) -> None:
        if self.seed == -1:
            self.seed = None
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = [] if self.stop_token_ids is None else list(dict.fromkeys(self.stop_token_ids))
        if self.bad_words is not None:
            self.bad_words = list(dict.fromkeys(self.bad_words))
        if self.logprobs is True:
            self.logprobs = 1
        if self.prompt_logprobs is True:
            self.prompt_logprobs = 1
        if self.logit_bias is not None:
            self.logit_bias = _normalize_logit_bias(self.logit_bias)
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(self.allowed_token_ids)
        if isinstance(self.structured_outputs, dict):
            try:
                self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
            except TypeError as exc:
                raise _fail("structured_outputs", f"structured_outputs: {exc}") from exc
        _require_number("temperature", self.temperature)
        if 0 < self.temperature < MIN_TEMPERATURE:
            logger.warning("temperature %s is below %s and would overflow; using %s.",
                           self.temperature, MIN_TEMPERATURE, MIN_TEMPERATURE)
            self.temperature = MIN_TEMPERATURE

    def _verify_args(self) -> None:
        _require_int("n", self.n)
        if self.n < 1:
            raise _fail("n", f"n must be at least 1, got {self.n}.")
        if self.best_of is not None:
            _require_int("best_of", self.best_of)
            if self.best_of < self.n:
                raise _fail("best_of", f"best_of must be >= n (n={self.n}), got {self.best_of}.")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _require_number(name, value)
            if not -2.0 <= value <= 2.0:
                raise _fail(name, f"{name} must be in [-2, 2], got {value}.")
        _require_number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0.0:
            raise _fail("repetition_penalty",
                        f"repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty}.")
        if self.temperature < 0.0:
            raise _fail("temperature", f"temperature must be >= 0 (0 means greedy), got {self.temperature}.")
        _require_number("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise _fail("top_p", f"top_p must be in (0, 1] (1 disables it), got {self.top_p}.")
        _require_int("top_k", self.top_k)
        if self.top_k < -1:
            raise _fail("top_k", f"top_k must be 0 or -1 (disabled) or at least 1, got {self.top_k}.")
        _require_number("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise _fail("min_p", f"min_p must be in [0, 1] (0 disables it), got {self.min_p}.")
        if self.seed is not None:
            _require_int("seed", self.seed)
        self._verify_lengths()
        self._verify_token_lists()

    def _verify_lengths(self) -> None:
        if self.max_tokens is not None:
            _require_int("max_tokens", self.max_tokens)
            if self.max_tokens < 1:
                raise _fail("max_tokens", f"max_tokens must be at least 1, got {self.max_tokens}.")
        _require_int("min_tokens", self.min_tokens)
        if self.min_tokens < 0:
            raise _fail("min_tokens", f"min_tokens must be >= 0, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise _fail("min_tokens",
                        f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}.")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is None:
                continue
            _require_int(name, value)
            if value < -1:
                raise _fail(name, f"{name} must be >= 0, or -1 for the whole vocabulary, got {value}.")
        if self.truncate_prompt_tokens is not None:
            _require_int("truncate_prompt_tokens", self.truncate_prompt_tokens)
            if self.truncate_prompt_tokens < 1 and self.truncate_prompt_tokens != -1:
                raise _fail("truncate_prompt_tokens",
                            "truncate_prompt_tokens must be at least 1, or -1 for the model's context limit, "
                            f"got {self.truncate_prompt_tokens}.")

    def _verify_token_lists(self) -> None:
        assert isinstance(self.stop, list) and isinstance(self.stop_token_ids, list)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise _fail("stop", f"stop must hold non-empty strings, got {self.stop!r}.")
        if self.stop and not self.detokenize:
            raise _fail("stop", "stop strings need detokenize=True; set detokenize=True or drop stop.")
        for name in ("stop_token_ids", "allowed_token_ids"):
            ids = getattr(self, name)
            if ids is not None and not all(_is_int(t) and t >= 0 for t in ids):
                raise _fail(name, f"{name} must hold non-negative integer token ids, got {ids!r}.")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise _fail("allowed_token_ids", "allowed_token_ids must not be empty; omit it to allow every token.")
        if self.bad_words is not None:
            for word in self.bad_words:
                if not isinstance(word, str) or not word.strip():
                    raise _fail("bad_words", f"bad_words must hold non-empty strings, got {self.bad_words!r}.")

    # ---- derived views ---------------------------------------------------------------------
    @property
    def sampling_type(self) -> SamplingType:
        if self.temperature < SAMPLING_EPS:
            return SamplingType.GREEDY
        if self.seed is not None:
            return SamplingType.RANDOM_SEED
        return SamplingType.RANDOM

    @property
    def has_penalties(self) -> bool:
        """Whether any of the presence, frequency or repetition penalties is on."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def bad_words_token_ids(self) -> list[list[int]] | None:
        """Token sequences of `bad_words`, set by `update_from_tokenizer`."""
        return self._bad_words_token_ids

    def all_stop_token_ids(self, eos_token_id: int | None = None) -> list[int]:
        """Tokens that end the request: `stop_token_ids`, plus EOS unless `ignore_eos`."""
        assert isinstance(self.stop_token_ids, list)
        if eos_token_id is None or self.ignore_eos or eos_token_id in self.stop_token_ids:
            return list(self.stop_token_ids)
        return [*self.stop_token_ids, eos_token_id]

    def clone(self) -> SamplingParams:
        """A deep copy that shares the compiled grammar and the reasoning gate (not worth copying)."""
        shared = self.compiled_grammar, self.reasoning_gate
        self.compiled_grammar = self.reasoning_gate = None
        try:
            twin = copy.deepcopy(self)
        finally:
            self.compiled_grammar, self.reasoning_gate = shared
        twin.compiled_grammar, twin.reasoning_gate = shared
        return twin

    # ---- checks that need the model ------------------------------------------------------
    def verify_logprobs(self, max_logprobs: int, vocab_size: int | None = None) -> None:
        """Reject logprobs/prompt_logprobs above `max_logprobs` (the server's --max-logprobs; -1: no limit).

        A request's -1 means the whole vocabulary: it counts as `vocab_size` when known.
        """
        if max_logprobs == -1:
            return
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is None:
                continue
            requested = value if value != -1 else (vocab_size if vocab_size is not None else math.inf)
            if requested > max_logprobs:
                shown = f"{value} (the whole vocabulary)" if value == -1 else str(value)
                raise _fail(name, f"{name} must be at most {max_logprobs} (--max-logprobs), got {shown}.")

    def verify_token_ids(self, vocab_size: int) -> None:
        """Reject token ids outside [0, vocab_size) in logit_bias, allowed_token_ids and stop_token_ids."""
        checks = (
            ("logit_bias", list(self.logit_bias or ())),
            ("allowed_token_ids", self.allowed_token_ids or []),
            ("stop_token_ids", self.stop_token_ids or []),
        )
        for name, ids in checks:
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise _fail(name, f"{name} has token ids {bad} outside the vocabulary [0, {vocab_size}).")

    def update_from_tokenizer(self, tokenizer: _Encoder) -> None:
        """Tokenize `bad_words` into `bad_words_token_ids`.

        Each word is encoded as written (stripped of leading spaces) and with one leading space,
        so it is banned at the start of the text and mid-sentence; the spaced form is kept only
        when it yields a different first token and the same number of tokens (vLLM's rule).
        """
        if not self.bad_words:
            return
        sequences: list[list[int]] = []
        for word in self.bad_words:
            for prefix in ("", " "):
                ids = _encode(tokenizer, prefix + word.lstrip())
                if not ids:
                    if not prefix:
                        raise _fail("bad_words", f"bad_words entry {word!r} encodes to no tokens.")
                    continue
                if not prefix or (ids[0] != sequences[-1][0] and len(ids) == len(sequences[-1])):
                    sequences.append(ids)
        self._bad_words_token_ids = sequences


def _encode(tokenizer: _Encoder, text: str) -> list[int]:
    encoded = tokenizer.encode(text, add_special_tokens=False)
    ids = getattr(encoded, "ids", encoded)  # a `tokenizers.Tokenizer` returns an Encoding
    return [int(t) for t in ids]


def _normalize_logit_bias(logit_bias: dict[Any, Any]) -> dict[int, float]:
    if not isinstance(logit_bias, dict):
        raise _fail("logit_bias", f"logit_bias must map token ids to numbers, got {logit_bias!r}.")
    result: dict[int, float] = {}
    for key, value in logit_bias.items():
        try:
            token_id = int(key)
        except (TypeError, ValueError):
            raise _fail("logit_bias", f"logit_bias keys must be integer token ids, got {key!r}.") from None
        if isinstance(key, float) and key != token_id or token_id < 0:
            raise _fail("logit_bias", f"logit_bias keys must be non-negative integer token ids, got {key!r}.")
        _require_number("logit_bias", value)
        result[token_id] = min(MAX_LOGIT_BIAS, max(-MAX_LOGIT_BIAS, float(value)))
    return result
