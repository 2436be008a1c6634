"""The model runner: turns a `SchedulerOutput` into one forward pass and sampled tokens.

It keeps a copy of every running request's tokens and block table between steps (the scheduler
sends only deltas; the tables live in one array, `BlockTables`), flattens all scheduled tokens
into one batch without padding, runs the model
once (decode steps: by replaying a CUDA graph when the worker captured them), computes logits
only for the rows that are sampled (plus prompt rows when prompt logprobs are asked for), and
samples.

`launch` queues a step and returns a `LaunchedStep` whose `result()` reads its sampled tokens back
to the host; `execute_model` does both at once. With asynchronous scheduling the engine core
launches step N+1 before it reads step N, so the host prepares the next step while the device
computes: a request's token that step N sampled is then fed to step N+1 on the device, its id
unknown to the host (a pending token), and penalties take it from there too. Rows whose sampling
needs their earlier tokens on the host (a grammar, a bad word of several tokens) cannot do
without them: a step with such a row queues its forward, then reads the previous step back before
it samples.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from kiln.config import EngineConfig
from kiln.core.outputs import LogprobsLists, ModelRunnerOutput
from kiln.core.sched_output import NewRequestData, SchedulerOutput
from kiln.model.forward_context import AttentionMetadata, forward_context
from kiln.sampling.metadata import SamplingMetadata, SamplingRow
from kiln.sampling.params import SamplingParams
from kiln.sampling.sampler import Sampler, SamplerOutput, compute_logprobs, to_logprobs_lists
from kiln.transfer import to_device
from kiln.worker.block_table import BlockTables

if TYPE_CHECKING:
    from kiln.structured.backend import GrammarState
    from kiln.worker.cuda_graphs import DecodeGraphs

_SEED_MIX = 0x9E3779B97F4A7C15
PROMPT_LOGPROBS_ROWS = 256
"""Prompt positions whose logprobs are computed at once."""


@dataclass
class RunnerRequestState:
    """The runner's copy of one request: grows by the tokens it samples itself."""

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    num_computed_tokens: int
    eos_token_id: int | None
    generator: torch.Generator | None = None
    grammar: GrammarState | None = None
    num_pending: int = 0
    """Tokens sampled by launched steps that the host has not read back yet (after `token_ids`)."""
    token_ids: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.token_ids = self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) + self.num_pending

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids) + self.num_pending

    def reads_own_tokens(self) -> bool:
        """Whether sampling this request's next token needs the ids of its earlier ones on the host:
        a grammar's matcher and a bad word's prefix do (penalties take a pending token on the
        device, min_tokens only counts it)."""
        return self.grammar is not None or any(len(seq) > 1 for seq in self.sampling_params.bad_words_token_ids or ())

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        self.output_token_ids.append(token_id)


@dataclass
class _Batch:
    """The flattened inputs of one step."""

    req_ids: list[str]
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    attn_metadata: AttentionMetadata
    sample_req_ids: list[str]
    sample_rows: torch.Tensor  # [num_sampled] row in the flattened batch whose logits are sampled
    prompt_logprob_rows: dict[str, tuple[int, int, int]]  # req_id -> (first row, num rows, first target position)


class LaunchedStep:
    """A step queued on the device; `result()` reads its sampled tokens back (once) and hands them
    to the runner's request states."""

    def __init__(self, runner: ModelRunner, req_ids: list[str], sample_req_ids: list[str],
                 out: SamplerOutput | None, prompt_logprobs: dict[str, LogprobsLists]) -> None:
        self.runner = runner
        self.req_ids = req_ids
        self.sample_req_ids = sample_req_ids
        self.sampled_token_ids = None if out is None else out.sampled_token_ids
        """On the device: the next step takes its pending tokens from here."""
        self.num_logprobs = [] if out is None or out.logprobs is None else [
            runner.requests[r].sampling_params.logprobs for r in sample_req_ids]
        """Each sampled request's k, taken now: the request may be gone when the step is read back."""
        self.prompt_logprobs = prompt_logprobs
        self._output: ModelRunnerOutput | None = None
        self._host: SamplerOutput | None = None
        self._ready: torch.cuda.Event | None = None
        if out is not None:
            self._host = SamplerOutput(*(None if t is None else t.to("cpu", non_blocking=True) for t in (
                out.sampled_token_ids, out.logprob_token_ids, out.logprobs, out.sampled_token_ranks)))
            if out.sampled_token_ids.is_cuda:
                self._ready = torch.cuda.Event()
                self._ready.record()

    @functools.cached_property
    def index_of(self) -> dict[str, int]:
        """Each sampled request's row in `sampled_token_ids` (only async scheduling asks)."""
        return {req_id: i for i, req_id in enumerate(self.sample_req_ids)}

    @property
    def done(self) -> bool:
        return self._output is not None

    def result(self) -> ModelRunnerOutput:
        if self._output is None:
            self._output = self._read_back()
        return self._output

    def _read_back(self) -> ModelRunnerOutput:
        sampled: dict[str, list[int]] = {}
        logprobs: dict[str, LogprobsLists] = {}
        if self._host is not None:
            if self._ready is not None:
                self._ready.synchronize()
            requests = self.runner.requests
            for req_id, token_id in zip(self.sample_req_ids, self._host.sampled_token_ids.tolist()):
                sampled[req_id] = [token_id]
                state = requests.get(req_id)
                if state is None:  # finished or preempted since: it was dropped
                    continue
                state.num_pending -= 1
                state.append_token(token_id)
                if state.grammar is not None:
                    state.grammar.advance(state.output_token_ids)
            if self._host.logprobs is not None:
                logprobs = self._logprobs_lists(self._host)
        return ModelRunnerOutput(
            req_ids=self.req_ids,
            sampled_token_ids=[sampled.get(r, []) for r in self.req_ids],
            logprobs=logprobs,
            prompt_logprobs=self.prompt_logprobs,
        )

    def _logprobs_lists(self, out: SamplerOutput) -> dict[str, LogprobsLists]:
        """One host transfer for the whole batch, then each request keeps its own 1 + k columns."""
        assert out.logprob_token_ids is not None and out.logprobs is not None and out.sampled_token_ranks is not None
        ids, lps, ranks = out.logprob_token_ids.tolist(), out.logprobs.tolist(), out.sampled_token_ranks.tolist()
        result = {}
        for i, (req_id, k) in enumerate(zip(self.sample_req_ids, self.num_logprobs)):
            if k is None:
                continue
            width = len(ids[i]) if k == -1 else k + 1
            result[req_id] = LogprobsLists([ids[i][:width]], [lps[i][:width]], [ranks[i]])
        return result


class ModelRunner:
    def __init__(self, config: EngineConfig, model: torch.nn.Module, device: torch.device) -> None:
        self.config = config
        self.model = model
        self.device = device
        self.block_size = config.cache_config.block_size
        self.vocab_size = config.model_config.vocab_size
        self.sampler = Sampler()
        self.requests: dict[str, RunnerRequestState] = {}
        sc = config.scheduler_config
        self.block_tables = BlockTables(sc.max_num_seqs + 1, -(-sc.max_model_len // self.block_size))
        self.decode_graphs: DecodeGraphs | None = None
        self.last_step: LaunchedStep | None = None
        """The latest launched step: the only one whose tokens can still be pending."""

    # ---- state updates -------------------------------------------------------------------
    def _add_request(self, new: NewRequestData) -> None:
        params = new.sampling_params
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device)
        grammar = None
        if params.compiled_grammar is not None:
            from kiln.structured.backend import GrammarState  # xgrammar: only once a grammar arrives

            grammar = GrammarState.for_compiled(params.compiled_grammar, params.reasoning_gate)
            grammar.replay(new.output_token_ids)  # resumed after preemption: catch the matcher up
        self.requests[new.req_id] = RunnerRequestState(
            req_id=new.req_id, prompt_token_ids=list(new.prompt_token_ids),
            output_token_ids=list(new.output_token_ids), sampling_params=params,
            num_computed_tokens=new.num_computed_tokens,
            eos_token_id=new.eos_token_id, generator=generator, grammar=grammar,
        )

    def _update_states(self, sched: SchedulerOutput) -> list[str]:
        for req_id in sched.finished_req_ids:
            self.requests.pop(req_id, None)
            self.block_tables.remove(req_id)
        order: list[str] = []
        for cached in sched.scheduled_cached_reqs:
            self.block_tables.append(cached.req_id, cached.new_block_ids)
            self.requests[cached.req_id].num_computed_tokens = cached.num_computed_tokens
            order.append(cached.req_id)
        for new in sched.scheduled_new_reqs:
            self._add_request(new)
            self.block_tables.add(new.req_id, new.block_ids)
            order.append(new.req_id)
        return order

    # ---- input preparation ---------------------------------------------------------------
    def _prepare_inputs(self, req_ids: list[str], num_scheduled: dict[str, int]) -> _Batch:
        input_ids: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        sample_req_ids: list[str] = []
        sample_rows: list[int] = []
        prompt_rows: dict[str, tuple[int, int, int]] = {}
        pending_rows: list[int] = []
        pending_index: list[int] = []
        for req_id in req_ids:
            state = self.requests[req_id]
            start, n = state.num_computed_tokens, num_scheduled[req_id]
            row0 = len(input_ids)
            if start >= len(state.token_ids):  # a decode of the token the last step sampled
                assert n == 1 and self.last_step is not None
                pending_rows.append(row0)
                pending_index.append(self.last_step.index_of[req_id])
                input_ids.append(0)
            elif n == 1:
                input_ids.append(state.token_ids[start])
            else:
                input_ids.extend(state.token_ids[start:start + n])
            query_lens.append(n)
            seq_lens.append(start + n)
            if start + n >= state.num_tokens:
                sample_req_ids.append(req_id)
                sample_rows.append(row0 + n - 1)
            if state.sampling_params.prompt_logprobs is not None:
                # Row at position p scores prompt token p + 1; the last prompt position scores an output.
                last = min(start + n, len(state.prompt_token_ids) - 1)
                if last > start:
                    prompt_rows[req_id] = (row0, last - start, start + 1)
        seq_lens_np = np.asarray(seq_lens, dtype=np.int64)
        table_rows = self.block_tables.rows(req_ids)
        block_table = self.block_tables.gather(table_rows)
        max_query_len = max(query_lens)
        if max_query_len == 1:  # a decode step: one token per request, at its last position
            positions = seq_lens_np - 1
            seq_index = np.arange(len(req_ids))
        else:
            positions = np.concatenate([np.arange(s - q, s) for q, s in zip(query_lens, seq_lens)])
            seq_index = np.repeat(np.arange(len(req_ids)), query_lens)
        slot_mapping = block_table[seq_index, positions // self.block_size].astype(np.int64) * self.block_size
        slot_mapping += positions % self.block_size
        query_start = np.zeros(len(query_lens) + 1, dtype=np.int32)
        np.cumsum(query_lens, out=query_start[1:])
        to_dev = lambda a: to_device(torch.from_numpy(a), self.device)  # noqa: E731
        input_ids_dev = to_dev(np.asarray(input_ids, dtype=np.int64))
        if pending_rows:
            assert self.last_step is not None and self.last_step.sampled_token_ids is not None
            index = to_dev(np.asarray(pending_index, dtype=np.int64))
            input_ids_dev[to_dev(np.asarray(pending_rows, dtype=np.int64))] = self.last_step.sampled_token_ids[index]
        metadata = AttentionMetadata(
            slot_mapping=to_dev(slot_mapping), query_start_loc=to_dev(query_start),
            seq_lens=to_dev(seq_lens_np.astype(np.int32)), block_tables=to_dev(block_table),
            max_query_len=max_query_len, max_seq_len=max(seq_lens),
            query_lens_cpu=query_lens, seq_lens_cpu=seq_lens,
        )
        return _Batch(
            req_ids=req_ids, input_ids=input_ids_dev,
            positions=to_dev(positions), attn_metadata=metadata, sample_req_ids=sample_req_ids,
            sample_rows=to_dev(np.asarray(sample_rows, dtype=np.int64)), prompt_logprob_rows=prompt_rows,
        )

    def _sampling_rows(self, req_ids: list[str]) -> list[SamplingRow]:
        rows = []
        for req_id in req_ids:
            state = self.requests[req_id]
            if state.generator is not None:
                # Reseed per position: a seeded request's draw depends only on its seed and how many
                # tokens it has produced, not on batch composition or preemption.
                seed = (state.sampling_params.seed * _SEED_MIX + state.num_output_tokens) % 2**63
                state.generator.manual_seed(seed)
            rows.append(SamplingRow(
                params=state.sampling_params, prompt_token_ids=state.prompt_token_ids,
                output_token_ids=state.output_token_ids, generator=state.generator,
                eos_token_id=state.eos_token_id,
                pending_index=self.last_step.index_of[req_id] if state.num_pending else None,  # type: ignore[union-attr]
            ))
        return rows

    # ---- the step ------------------------------------------------------------------------
    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.launch(sched).result()

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput) -> LaunchedStep:
        """Queue one step. The previous step must have been launched by this runner, and every
        step before it read back."""
        req_ids = self._update_states(sched)
        if not req_ids:
            return LaunchedStep(self, [], [], None, {})
        batch = self._prepare_inputs(req_ids, sched.num_scheduled_tokens)
        hidden = self._run_model(batch)  # [num_tokens, hidden_size]
        last = self.last_step
        if last is not None and not last.done and any(
            self.requests[r].num_pending and self.requests[r].reads_own_tokens() for r in batch.sample_req_ids
        ):
            last.result()  # after queueing this step's forward, so the wait overlaps it
        out = None
        if batch.sample_req_ids:
            logits = self.model.compute_logits(hidden[batch.sample_rows])  # [num_sampled, vocab]
            logits = self._apply_grammars(batch.sample_req_ids, logits)
            metadata = SamplingMetadata.build(
                self._sampling_rows(batch.sample_req_ids), self.vocab_size, self.device,
                None if last is None or last.done else last.sampled_token_ids,
            )
            out = self.sampler.forward(logits, metadata)
            for req_id in batch.sample_req_ids:
                self.requests[req_id].num_pending += 1
        step = LaunchedStep(self, req_ids, batch.sample_req_ids, out, self._prompt_logprobs(batch, hidden))
        self.last_step = step
        return step

    def _run_model(self, batch: _Batch) -> torch.Tensor:
        graphs = self.decode_graphs
        if graphs is not None and (size := graphs.graph_size(batch.attn_metadata)) is not None:
            return graphs.run(size, batch.input_ids, batch.positions, batch.attn_metadata)
        with forward_context(batch.attn_metadata):
            return self.model(batch.input_ids, batch.positions)

    def _apply_grammars(self, req_ids: list[str], logits: torch.Tensor) -> torch.Tensor:
        """Mask each constrained request's row to the tokens its grammar allows next (on a float32
        copy of the logits, the dtype xgrammar's CPU mask takes)."""
        rows = [i for i, r in enumerate(req_ids)
                if (grammar := self.requests[r].grammar) is not None and grammar.masks_next_token]
        if not rows:
            return logits
        from kiln.structured.backend import allocate_bitmask, apply_bitmask

        logits = logits.float()
        bitmask = allocate_bitmask(len(req_ids), logits.shape[-1])
        for row in rows:
            self.requests[req_ids[row]].grammar.fill_bitmask(bitmask, row)  # type: ignore[union-attr]
        apply_bitmask(logits, bitmask, rows)
        return logits

    def _prompt_logprobs(self, batch: _Batch, hidden: torch.Tensor) -> dict[str, LogprobsLists]:
        """Each prompt position's logprobs, `PROMPT_LOGPROBS_ROWS` positions at a time: a whole
        chunk at once would hold ~11 bytes per position and vocabulary entry (8192 positions of a
        152k vocabulary: 13 GB, outside the memory profile's budget)."""
        result = {}
        for req_id, (row0, num_rows, target0) in batch.prompt_logprob_rows.items():
            state = self.requests[req_id]
            k = state.sampling_params.prompt_logprobs
            lists = LogprobsLists([], [], [])
            for start in range(0, num_rows, PROMPT_LOGPROBS_ROWS):
                n = min(PROMPT_LOGPROBS_ROWS, num_rows - start)
                logits = self.model.compute_logits(hidden[row0 + start:row0 + start + n])
                targets = torch.tensor(state.token_ids[target0 + start:target0 + start + n], device=self.device)
                lists.extend(to_logprobs_lists(*compute_logprobs(logits, k, targets), num_logprobs=k))
            result[req_id] = lists
        return result

    @torch.inference_mode()
    def profile_run(self, bind_cache: Callable[[int], None]) -> int:
        """One forward of a full token budget on a throwaway cache, then the sampler's heaviest path
        on as many rows as a step may sample, to measure peak activations."""
        sc = self.config.scheduler_config
        num_tokens = min(sc.max_num_batched_tokens, sc.max_model_len)
        num_blocks = -(-num_tokens // self.block_size)
        bind_cache(num_blocks)
        state = RunnerRequestState(
            req_id="profile", prompt_token_ids=[0] * num_tokens, output_token_ids=[],
            sampling_params=SamplingParams(max_tokens=1), num_computed_tokens=0, eos_token_id=None,
        )
        self.requests[state.req_id] = state
        self.block_tables.add(state.req_id, list(range(num_blocks)))
        try:
            batch = self._prepare_inputs([state.req_id], {state.req_id: num_tokens})
            with forward_context(batch.attn_metadata):
                hidden = self.model(batch.input_ids, batch.positions)
            self._profile_sampler(hidden[:min(max(sc.max_num_seqs, PROMPT_LOGPROBS_ROWS), num_tokens)])
        finally:
            del self.requests[state.req_id]
            self.block_tables.remove(state.req_id)
        return num_tokens

    def _profile_sampler(self, hidden: torch.Tensor) -> None:
        """Sample every row of `hidden` with each of the sampler's [rows, vocab] steps on: logprobs,
        penalties, min-p, top-k and top-p (on a GPU a full sort). With a large vocabulary this
        peak (e.g. 256 rows of 152k: ~1 GB) can exceed the forward's, and prompt logprobs take the
        same steps on up to `PROMPT_LOGPROBS_ROWS` rows."""
        params = SamplingParams(temperature=0.7, top_p=0.9, top_k=50, min_p=0.05, presence_penalty=0.5,
                                logprobs=self.config.max_logprobs, max_tokens=1)  # -1 (no limit): all
        rows = [SamplingRow(params=params, prompt_token_ids=[0], output_token_ids=[0]) for _ in range(hidden.shape[0])]
        self.sampler.forward(self.model.compute_logits(hidden),
                             SamplingMetadata.build(rows, self.vocab_size, self.device))
