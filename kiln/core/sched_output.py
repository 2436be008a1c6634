"""What one engine step runs: the contract between the scheduler and the model runner.

Owned by the scheduler, read by the model runner. New requests (and requests resuming after
preemption) travel in full; requests the runner already holds travel as deltas, because the
runner keeps its own copy of each request's tokens and block table between steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kiln.sampling.params import SamplingParams


@dataclass(slots=True)
class NewRequestData:
    """A request the runner has not seen, or sees again after preemption."""

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    """Tokens generated before a preemption; empty for a fresh request."""
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    """Tokens whose KV is already in the cache (prefix cache hits)."""
    eos_token_id: int | None


@dataclass(slots=True)
class CachedRequestData:
    """A request the runner already holds: only what changed."""

    req_id: str
    new_block_ids: list[int]
    """Blocks appended to the request's block table this step."""
    num_computed_tokens: int


@dataclass(slots=True)
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: list[CachedRequestData]
    num_scheduled_tokens: dict[str, int]
    """Tokens each scheduled request runs this step (a prefill chunk, or 1 for a decode)."""
    total_num_scheduled_tokens: int
    finished_req_ids: set[str] = field(default_factory=set)
    """Requests finished, aborted or preempted since the last step: the runner drops their state."""

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0
