"""The xgrammar backend: compile constraints once, then one matcher per request.

Compilation happens when a request is admitted by the input processor (off the engine's step
loop) and is cached per distinct constraint. Each step the model runner asks every constrained
request's matcher for a token bitmask, applies it to that request's logits row only, and
advances the matcher with the sampled token. Requests without a constraint cost nothing.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import torch
import xgrammar as xgr

from kiln.errors import InvalidRequestError
from kiln.structured.params import StructuredOutputsParams

_CACHE_SIZE = 256


class XgrammarBackend:
    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.tokenizer_info = self.tokenizer_info_of(tokenizer, vocab_size)
        self.compiler = xgr.GrammarCompiler(self.tokenizer_info, cache_enabled=True)
        self._compile = functools.lru_cache(maxsize=_CACHE_SIZE)(self._compile_uncached)

    @staticmethod
    def tokenizer_info_of(tokenizer: Any, vocab_size: int) -> xgr.TokenizerInfo:
        """xgrammar's view of the vocabulary; the engine core process rebuilds compiled grammars over
        its own, built the same way."""
        return xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)

    def compile(self, params: StructuredOutputsParams) -> xgr.CompiledGrammar:
        """Compile (or fetch from the cache); an invalid constraint raises InvalidRequestError with
        the compiler's message."""
        return self._compile(params.cache_key())

    def _compile_uncached(self, key: tuple[str, str, str | None, bool]) -> xgr.CompiledGrammar:
        kind, value, whitespace, no_whitespace = key
        try:
            if kind == "json":
                json.loads(value)  # a clear message for text that is not JSON at all
                return self.compiler.compile_json_schema(
                    value, any_whitespace=not no_whitespace, strict_mode=True,
                )
            if kind == "json_object":
                return self.compiler.compile_builtin_json_grammar()
            if kind == "regex":
                return self.compiler.compile_regex(value)
            if kind == "choice":
                choices = json.loads(value)
                return self.compiler.compile_regex("|".join(_regex_escape(c) for c in choices))
            return self.compiler.compile_grammar(value)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise InvalidRequestError(f"Invalid {kind} constraint: {exc}", f"structured_outputs.{kind}") from exc



class GrammarState:
    """One request's position in its grammar. With a reasoning gate, the grammar starts constraining
    only once the output has left its thinking part; the content tokens produced so far are then
    replayed into the matcher."""

    def __init__(self, matcher: xgr.GrammarMatcher, reasoning_gate: Any = None) -> None:
        self.matcher = matcher
        self.reasoning_gate = reasoning_gate
        self.constraining = reasoning_gate is None

    @classmethod
    def for_compiled(cls, compiled: xgr.CompiledGrammar, reasoning_gate: Any = None) -> GrammarState:
        return cls(xgr.GrammarMatcher(compiled), reasoning_gate)

    @property
    def masks_next_token(self) -> bool:
        """False before the gate opens and after the grammar accepted a stop token (with async
        scheduling the request may run one more step, whose token is dropped)."""
        return self.constraining and not self.matcher.is_terminated()

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def advance(self, output_token_ids: list[int]) -> None:
        """Account for the newest of `output_token_ids` (the request's whole output so far)."""
        if self.constraining:
            self._accept(output_token_ids[-1])
        elif self.reasoning_gate.is_reasoning_end(output_token_ids):
            self.constraining = True
            for token_id in self.reasoning_gate.extract_content_ids(output_token_ids):
                self._accept(token_id)

    def replay(self, output_token_ids: list[int]) -> None:
        """Bring a fresh matcher to the state after `output_token_ids` (a request resumed after preemption)."""
        if self.reasoning_gate is None:
            for token_id in output_token_ids:
                self._accept(token_id)
        elif output_token_ids:
            self.advance(output_token_ids)

    def _accept(self, token_id: int) -> None:
        # a token the grammar refuses (only possible if the mask was bypassed) leaves the matcher as it was
        if not self.matcher.is_terminated():
            self.matcher.accept_token(token_id)


def allocate_bitmask(num_rows: int, vocab_size: int) -> torch.Tensor:
    """A packed bitmask (32 tokens per int32) for `num_rows` logits rows, all tokens allowed."""
    return xgr.allocate_token_bitmask(num_rows, vocab_size)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Mask the disallowed tokens of `rows` to -inf, in place; other rows are untouched."""
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), indices=rows)


def _regex_escape(text: str) -> str:
    special = set(r".^$*+?{}[]\|()")
    return "".join("\\" + ch if ch in special else ch for ch in text)
