"""One generation request as the scheduler sees it: its tokens, its progress, its state.

Owns the request state machine (`RequestStatus`) and `num_computed_tokens`, the number of
leading tokens whose KV is in the cache. With asynchronous scheduling a request can be scheduled
again before its last step's results are back: `num_in_flight_tokens` and
`num_output_placeholders` count what that step will add. The scheduler drives every transition; the KV cache
manager owns the request's blocks. Pure Python: must not import torch.

    WAITING --schedule--> RUNNING --finish--> FINISHED_STOPPED | FINISHED_LENGTH_CAPPED
       ^                     |
       +--- PREEMPTED <------+ (blocks freed, recomputed from token 0 when resumed)
    any state --abort--> FINISHED_ABORTED
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kiln.core.block_hash import BlockHash
    from kiln.sampling.params import SamplingParams


class RequestStatus(enum.IntEnum):
    """Every finished status sorts after PREEMPTED."""

    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH_CAPPED = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @staticmethod
    def is_finished(status: RequestStatus) -> bool:
        return status > RequestStatus.PREEMPTED

    @staticmethod
    def finish_reason(status: RequestStatus) -> str | None:
        """The OpenAI finish_reason of a finished status ("stop", "length", "abort"), else None."""
        return _FINISH_REASONS.get(status)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH_CAPPED: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


@dataclass(slots=True)
class EngineCoreRequest:
    """A validated, tokenized request as the core receives it."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None
    max_tokens: int
    arrival_time: float
    priority: int = 0
    prefill_leader_id: str | None = None


class Request:
    """A prompt plus the tokens generated so far.

    Invariants: `all_token_ids == prompt_token_ids + output_token_ids`;
    `0 <= num_computed_tokens <= num_tokens`; `block_hashes[i]` covers tokens
    `[i * block_size, (i + 1) * block_size)` and exists only for full blocks.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams | Any,
        eos_token_id: int | None,
        arrival_time: float | None = None,
        priority: int = 0,
        max_tokens: int | None = None,
        prefill_leader_id: str | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_id = eos_token_id
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.priority = priority
        if max_tokens is None:
            max_tokens = getattr(sampling_params, "max_tokens", None)
        self.max_tokens: int | None = max_tokens
        """Output tokens allowed (resolved by the engine); None means only max_model_len caps it."""
        self.prefill_leader_id = prefill_leader_id
        """For the n>1 samples of one prompt: the request whose prefill this one waits for."""

        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(self.prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_in_flight_tokens = 0
        """Tokens of steps scheduled but not yet processed (async scheduling; 0 between sync steps)."""
        self.num_output_placeholders = 0
        """Tokens those steps will sample, whose ids are not known yet."""
        self.num_cached_tokens = -1
        """Prefix-cache hit tokens at first scheduling; -1 until then."""
        self.status = RequestStatus.WAITING
        self.stop_reason: int | None = None
        self.block_hashes: list[BlockHash] = []
        self.num_preemptions = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_started_tokens(self) -> int:
        """Tokens computed or being computed: where the next step starts."""
        return self.num_computed_tokens + self.num_in_flight_tokens

    @property
    def is_finished(self) -> bool:
        return RequestStatus.is_finished(self.status)

    @property
    def finish_reason(self) -> str | None:
        return RequestStatus.finish_reason(self.status)

    def append_output_token_ids(self, token_ids: int | list[int]) -> None:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        self.output_token_ids.extend(token_ids)
        self.all_token_ids.extend(token_ids)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, "
            f"computed={self.num_computed_tokens}/{self.num_tokens})"
        )
