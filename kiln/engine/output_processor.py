"""Turns core outputs (token ids, raw logprob rows) into user-facing RequestOutputs.

Per sample it runs the incremental detokenizer, checks stop strings (a hit finishes the sample
here and asks the core to free it), and formats logprobs. The samples of an n > 1 request are
gathered under their parent; with best_of > n the n best by cumulative logprob are returned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kiln.core.outputs import EngineCoreOutput, LogprobsLists
from kiln.engine.detokenizer import IncrementalDetokenizer, decode_token
from kiln.engine.input_processor import child_request_id
from kiln.logger import init_logger
from kiln.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestOutput, SampleLogprobs
from kiln.sampling.params import SamplingParams

logger = init_logger(__name__)


@dataclass
class SampleState:
    """One sample (child request) of a user request."""

    index: int
    params: SamplingParams
    detokenizer: IncrementalDetokenizer | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: SampleLogprobs | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def text(self) -> str:
        """The text so far; while unfinished it withholds what a stop string could still claim,
        so successive texts only ever extend each other (streaming sends the difference)."""
        if self.detokenizer is None:
            return ""
        return self.detokenizer.get_next_output_text(finished=self.finish_reason is not None, delta=False)

    def to_output(self) -> CompletionOutput:
        return CompletionOutput(
            index=self.index, text=self.text, token_ids=list(self.token_ids),
            cumulative_logprob=self.cumulative_logprob if self.params.logprobs is not None else None,
            logprobs=self.logprobs, finish_reason=self.finish_reason, stop_reason=self.stop_reason,
        )


@dataclass
class ParentState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: dict[str, SampleState]
    prompt_logprobs: PromptLogprobs | None = None
    num_cached_tokens: int = 0
    final_only: bool = False  # report the request once, when it finishes (the offline LLM's way)

    @property
    def finished(self) -> bool:
        for sample in self.samples.values():  # a loop, not all(genexpr): called per request per step
            if sample.finish_reason is None:
                return False
        return True

    def to_output(self, finished: bool) -> RequestOutput:
        """`finished`: `self.finished`, which the caller has already computed this step."""
        samples = sorted(self.samples.values(), key=lambda s: s.index)
        if len(samples) > self.params.n:  # best_of: keep the n most likely samples
            samples = sorted(samples, key=lambda s: -s.cumulative_logprob)[: self.params.n]
            for new_index, sample in enumerate(samples):
                sample.index = new_index
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt, prompt_token_ids=self.prompt_token_ids,
            prompt_logprobs=self.prompt_logprobs, outputs=[s.to_output() for s in samples],
            finished=finished, num_cached_tokens=self.num_cached_tokens,
        )


class OutputProcessor:
    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer
        self.parents: dict[str, ParentState] = {}
        self.parent_of: dict[str, str] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, final_only: bool = False) -> None:
        """`final_only`: `process_outputs` returns this request's output only once it has finished
        (an offline batch needs no partial outputs; building one copies every token so far)."""
        num = params.best_of or params.n
        samples = {}
        for index in range(num):
            child_id = child_request_id(request_id, index, num)
            detok = None
            if self.tokenizer is not None and params.detokenize:
                detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params)
            samples[child_id] = SampleState(index=index, params=params, detokenizer=detok)
            self.parent_of[child_id] = request_id
        prompt_logprobs: PromptLogprobs | None = [None] if params.prompt_logprobs is not None else None
        self.parents[request_id] = ParentState(request_id, prompt, prompt_token_ids, params, samples, prompt_logprobs,
                                               final_only=final_only)

    def child_ids(self, request_id: str) -> list[str]:
        parent = self.parents.get(request_id)
        return list(parent.samples) if parent else []

    def abort_request(self, request_id: str) -> None:
        parent = self.parents.pop(request_id, None)
        for child_id in parent.samples if parent else ():
            self.parent_of.pop(child_id, None)

    def process_outputs(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Returns the updated RequestOutputs and the child ids the core must stop (stop strings)."""
        touched: dict[str, ParentState] = {}
        to_abort: list[str] = []
        for out in outputs:
            parent_id = self.parent_of.get(out.req_id)
            if parent_id is None:
                continue
            parent = self.parents[parent_id]
            sample = parent.samples[out.req_id]
            if sample.finish_reason is not None:
                continue
            try:
                if out.new_prompt_logprobs is not None and parent.prompt_logprobs is not None:
                    parent.prompt_logprobs.extend(self._format_logprobs(out.new_prompt_logprobs))
                parent.num_cached_tokens = max(parent.num_cached_tokens, out.num_cached_tokens)
                if self._update_sample(sample, out):
                    to_abort.append(out.req_id)
            except Exception:  # one request's failure (say, in detokenization) ends that request only
                logger.exception("Processing the output of request %s failed; aborting it", out.req_id)
                sample.finish_reason, sample.stop_reason = "abort", None
                to_abort.append(out.req_id)
            touched[parent_id] = parent
        results = []
        for parent_id, parent in touched.items():
            finished = parent.finished
            if finished or not parent.final_only:
                results.append(parent.to_output(finished))
            if finished:
                self.abort_request(parent_id)
        return results, to_abort

    def _update_sample(self, sample: SampleState, out: EngineCoreOutput) -> bool:
        """Apply one core output; True when a stop string finished the sample here."""
        sample.token_ids.extend(out.new_token_ids)
        if out.new_logprobs is not None:
            rows = self._format_logprobs(out.new_logprobs)
            sample.cumulative_logprob += sum(lp[0] for lp in out.new_logprobs.logprobs)
            if sample.params.logprobs is not None:
                sample.logprobs = (sample.logprobs or []) + rows
        finish_reason, stop_reason = out.finish_reason, out.stop_reason
        stopped_by_string = False
        if sample.detokenizer is not None and out.new_token_ids:
            stop_terminated = finish_reason == "stop"
            stop_string = sample.detokenizer.update(out.new_token_ids, stop_terminated)
            if stop_string is not None and finish_reason is None:
                finish_reason, stop_reason, stopped_by_string = "stop", stop_string, True
            elif stop_string is not None:
                finish_reason, stop_reason = "stop", stop_string
        sample.finish_reason, sample.stop_reason = finish_reason, stop_reason
        return stopped_by_string

    def _format_logprobs(self, rows: LogprobsLists) -> list[dict[int, Logprob]]:
        formatted = []
        for ids, lps, rank in zip(rows.token_ids, rows.logprobs, rows.ranks):
            entry: dict[int, Logprob] = {}
            for position, (token_id, lp) in enumerate(zip(ids, lps)):
                if token_id in entry:
                    continue
                entry[token_id] = Logprob(
                    logprob=lp, rank=rank if position == 0 else position,
                    decoded_token=decode_token(self.tokenizer, token_id) if self.tokenizer is not None else None,
                )
            formatted.append(entry)
        return formatted
