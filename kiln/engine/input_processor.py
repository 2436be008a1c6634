"""Turns a user prompt and SamplingParams into validated core requests.

Everything a user can get wrong is checked here, before the engine core sees the request:
prompt length against max_model_len, token ids against the vocabulary, logprobs against
max_logprobs. A request with n > 1 becomes n child requests; the children after the first
wait for the first to prefill the prompt, then share its cached KV blocks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kiln.config import EngineConfig
from kiln.core.request import EngineCoreRequest
from kiln.errors import InvalidRequestError
from kiln.sampling.params import SamplingParams

if TYPE_CHECKING:
    from kiln.structured.backend import XgrammarBackend

PromptType = str | dict[str, Any]


@dataclass(slots=True)
class ProcessedPrompt:
    prompt: str | None
    prompt_token_ids: list[int]


def child_request_id(request_id: str, index: int, num_children: int) -> str:
    return request_id if num_children == 1 else f"{index}_{request_id}"


class InputProcessor:
    def __init__(self, config: EngineConfig, tokenizer: Any | None, eos_token_id: int | None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id
        self.vocab_size = config.model_config.vocab_size
        self.max_model_len = config.model_config.max_model_len
        self._grammar_backend: XgrammarBackend | None = None

    def compile_grammar(self, params: SamplingParams) -> None:
        """Compile the request's constraint (cached per distinct constraint) before it is queued."""
        if params.structured_outputs is None:
            return
        if self.tokenizer is None:
            raise InvalidRequestError("Structured output needs a tokenizer (skip_tokenizer_init is set).")
        if self._grammar_backend is None:
            from kiln.structured.backend import XgrammarBackend

            self._grammar_backend = XgrammarBackend(self.tokenizer, self.vocab_size)
        params.compiled_grammar = self._grammar_backend.compile(params.structured_outputs)

    def tokenize(self, prompt: PromptType, params: SamplingParams) -> ProcessedPrompt:
        if isinstance(prompt, str):
            text, token_ids = prompt, None
        elif isinstance(prompt, dict) and ("prompt_token_ids" in prompt or "prompt" in prompt):
            text, token_ids = prompt.get("prompt"), prompt.get("prompt_token_ids")
        else:
            raise InvalidRequestError(
                f"A prompt is a string or a dict with 'prompt' or 'prompt_token_ids', not {type(prompt).__name__}."
            )
        if token_ids is None:
            if self.tokenizer is None:
                raise InvalidRequestError("This engine has no tokenizer (skip_tokenizer_init): pass prompt_token_ids.")
            token_ids = self.tokenizer.encode(text)
        token_ids = list(token_ids)
        if params.truncate_prompt_tokens is not None and params.truncate_prompt_tokens > 0:
            token_ids = token_ids[-params.truncate_prompt_tokens:]
        return ProcessedPrompt(prompt=text, prompt_token_ids=token_ids)

    def _validate(self, token_ids: list[int], params: SamplingParams) -> int:
        """Check the prompt and return the number of output tokens the request may produce."""
        if not token_ids:
            raise InvalidRequestError("The prompt is empty: it must contain at least one token.", "prompt")
        bad = next((t for t in token_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(
                f"Prompt token id {bad!r} is outside the vocabulary (0 to {self.vocab_size - 1}).", "prompt"
            )
        num_prompt = len(token_ids)
        if num_prompt >= self.max_model_len:
            raise InvalidRequestError(
                f"The prompt has {num_prompt} tokens, but the model's context length is {self.max_model_len}: "
                "it leaves no room for output.", "prompt",
            )
        room = self.max_model_len - num_prompt
        if params.max_tokens is None:
            return room
        if params.max_tokens > room:
            raise InvalidRequestError(
                f"max_tokens={params.max_tokens} plus the prompt's {num_prompt} tokens exceeds the context "
                f"length {self.max_model_len}; ask for at most {room} tokens.", "max_tokens",
            )
        return params.max_tokens

    def process(
        self, request_id: str, prompt: ProcessedPrompt, params: SamplingParams, priority: int = 0,
        arrival_time: float | None = None,
    ) -> list[EngineCoreRequest]:
        max_tokens = self._validate(prompt.prompt_token_ids, params)
        params.verify_logprobs(self.config.max_logprobs)
        params.verify_token_ids(self.vocab_size)
        if params.bad_words and self.tokenizer is not None:
            params.update_from_tokenizer(self.tokenizer)
        self.compile_grammar(params)
        if priority != 0 and self.config.scheduler_config.policy != "priority":
            raise InvalidRequestError(
                f"priority={priority} needs the server to run with --scheduling-policy priority.", "priority"
            )
        arrival = time.monotonic() if arrival_time is None else arrival_time
        num_children = params.best_of or params.n
        children = []
        for index in range(num_children):
            child_params = params
            if num_children > 1:
                child_params = params.clone()
                child_params.n = 1
                child_params.best_of = None
                if params.seed is not None:
                    child_params.seed = params.seed + index
                if params.best_of is not None and params.best_of > params.n and params.logprobs is None:
                    child_params.logprobs = 0  # best_of ranks the samples by cumulative logprob
            children.append(EngineCoreRequest(
                request_id=child_request_id(request_id, index, num_children),
                prompt_token_ids=prompt.prompt_token_ids, sampling_params=child_params,
                eos_token_id=self.eos_token_id, max_tokens=max_tokens, arrival_time=arrival,
                priority=priority,
                prefill_leader_id=child_request_id(request_id, 0, num_children) if index else None,
            ))
        return children
