"""SamplingMetadata: the per-step tensors the sampler reads, built once for the rows sampled this step.

Owned by the model runner, which builds it each step from its request states and hands it to the
`Sampler`; nothing keeps it after the step. A tensor that no row of the step needs is None, so a
batch of plain greedy or plain random rows pays for one or two [B] tensors and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from kiln.sampling.params import SamplingParams, SamplingType
from kiln.transfer import to_device


@dataclass(slots=True)
class SamplingRow:
    """One row to sample: a request's settings and its tokens so far."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    """The live list of tokens generated so far (not copied; read during this step only)."""
    generator: torch.Generator | None = None
    """The request's own generator, for seeded rows; already positioned by the caller."""
    eos_token_id: int | None = None
    pending_index: int | None = None
    """Asynchronous scheduling: the row of `build`'s `pending_token_ids` holding this request's latest
    token, sampled by the step before but not read back yet (it follows `output_token_ids`)."""

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids) + (self.pending_index is not None)


@dataclass(slots=True)
class SamplingMetadata:
    """Batched sampling settings for B rows; row i of every tensor is `rows[i]` of `build`.

    Invariants: `temperature` is None when no row divides its logits (all greedy, or every random
    row at temperature 1: x / 1 is x, so skipping the pass changes nothing); greedy rows hold
    temperature 1.0 so the random path can run on the whole batch, and `greedy_mask` marks them
    when the batch is mixed.
    Disabled filters hold neutral values (top_k = vocab_size, top_p = 1, min_p = 0).
    """

    num_rows: int
    vocab_size: int
    all_greedy: bool
    all_random: bool
    temperature: torch.Tensor | None  # [B] float32
    greedy_mask: torch.Tensor | None  # [B] bool, only for mixed batches
    top_p: torch.Tensor | None  # [B] float32
    top_k: torch.Tensor | None  # [B] int64
    max_top_k: int
    """The largest enabled top_k, known on the host so top-k needs no sync."""
    min_p: torch.Tensor | None  # [B] float32
    generators: dict[int, torch.Generator]
    max_num_logprobs: int | None
    """Top logprobs to return per row (the batch maximum, -1 resolved to vocab_size); None: none asked."""
    no_penalties: bool
    presence_penalties: torch.Tensor | None = None  # [B] float32
    frequency_penalties: torch.Tensor | None = None  # [B] float32
    repetition_penalties: torch.Tensor | None = None  # [B] float32
    prompt_token_ids: torch.Tensor | None = None  # [B, max_prompt_len] int64, padded with vocab_size
    output_token_ids_padded: torch.Tensor | None = None  # [B, max_output_len] int64, padded with vocab_size
    output_token_ids: list[list[int]] = field(default_factory=list)
    """Per row, the live lists of generated tokens (bad words read them)."""
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    """(row indices, token ids, biases), one entry per (row, token) pair."""
    allowed_token_ids: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    """(rows restricted to a list, then one (row, token id) pair per allowed token)."""
    bad_words_token_ids: dict[int, list[list[int]]] = field(default_factory=dict)
    min_tokens: dict[int, list[int]] = field(default_factory=dict)
    """Row -> the token ids it may not sample yet, for rows still short of their min_tokens."""

    @classmethod
    def build(cls, rows: list[SamplingRow], vocab_size: int, device: torch.device | str,
              pending_token_ids: torch.Tensor | None = None) -> SamplingMetadata:
        """Batch the settings of `rows` (one per sampled request, in logits row order) onto `device`.

        A seeded row without a generator falls back to the global RNG. `pending_token_ids` (on
        `device`) holds the tokens of rows with a `pending_index`: penalties copy them on the device
        and min_tokens only counts them, so neither waits for the host to read them. Bad words
        cannot do without the ids; the caller reads such rows' tokens back first.
        """
        num_rows = len(rows)
        params = [r.params for r in rows]
        types = [p.sampling_type for p in params]
        all_greedy = all(t == SamplingType.GREEDY for t in types)
        all_random = not any(t == SamplingType.GREEDY for t in types)

        temperature = greedy_mask = top_p = top_k = min_p = None
        max_top_k = vocab_size
        generators: dict[int, torch.Generator] = {}
        if not all_greedy:
            temperatures = [1.0 if t == SamplingType.GREEDY else p.temperature for p, t in zip(params, types)]
            if any(t != 1.0 for t in temperatures):
                temperature = _f32(temperatures, device)
            if not all_random:
                greedy_mask = to_device(torch.tensor([t == SamplingType.GREEDY for t in types], dtype=torch.bool), device)
            if any(p.top_p < 1.0 for p in params):
                top_p = _f32([p.top_p for p in params], device)
            ks = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
            if any(k < vocab_size for k in ks):
                top_k = to_device(torch.tensor(ks, dtype=torch.int64), device)
                max_top_k = max(k for k in ks if k < vocab_size)
            if any(p.min_p > 0.0 for p in params):
                min_p = _f32([p.min_p for p in params], device)
            generators = {
                i: r.generator for i, (r, t) in enumerate(zip(rows, types))
                if t == SamplingType.RANDOM_SEED and r.generator is not None
            }

        asked = [p.logprobs for p in params if p.logprobs is not None]
        max_num_logprobs = None
        if asked:
            max_num_logprobs = vocab_size if -1 in asked else min(max(asked), vocab_size)

        metadata = cls(
            num_rows=num_rows, vocab_size=vocab_size, all_greedy=all_greedy, all_random=all_random,
            temperature=temperature, greedy_mask=greedy_mask, top_p=top_p, top_k=top_k, max_top_k=max_top_k,
            min_p=min_p, generators=generators, max_num_logprobs=max_num_logprobs, no_penalties=True,
            output_token_ids=[r.output_token_ids for r in rows],
        )
        metadata._add_penalties(rows, device, pending_token_ids)
        metadata._add_token_constraints(rows, device)
        return metadata

    def _add_penalties(self, rows: list[SamplingRow], device: torch.device | str,
                       pending_token_ids: torch.Tensor | None) -> None:
        penalized = [r.params.has_penalties for r in rows]
        if not any(penalized):
            return
        self.no_penalties = False
        self.presence_penalties = _f32([r.params.presence_penalty for r in rows], device)
        self.frequency_penalties = _f32([r.params.frequency_penalty for r in rows], device)
        self.repetition_penalties = _f32([r.params.repetition_penalty for r in rows], device)
        # Rows without penalties contribute no tokens: their neutral factors make them no-ops anyway.
        self.prompt_token_ids = _pad(
            [r.prompt_token_ids if on else [] for r, on in zip(rows, penalized)], self.vocab_size, device
        )
        outputs = [r.output_token_ids if on else [] for r, on in zip(rows, penalized)]
        pending = [(i, len(r.output_token_ids), r.pending_index) for i, (r, on) in enumerate(zip(rows, penalized))
                   if on and r.pending_index is not None]
        width = max([len(o) for o in outputs] + [column + 1 for _, column, _ in pending])
        self.output_token_ids_padded = _pad(outputs, self.vocab_size, device, width)
        if pending:
            assert pending_token_ids is not None
            row, column, source = (to_device(torch.tensor(v, dtype=torch.int64), device) for v in zip(*pending))
            self.output_token_ids_padded[row, column] = pending_token_ids[source]

    def _add_token_constraints(self, rows: list[SamplingRow], device: torch.device | str) -> None:
        vocab_size = self.vocab_size
        bias_rows: list[int] = []
        bias_ids: list[int] = []
        bias_values: list[float] = []
        allowed_rows: list[int] = []
        allowed_pairs: tuple[list[int], list[int]] = ([], [])
        for i, row in enumerate(rows):
            p = row.params
            for token_id, bias in (p.logit_bias or {}).items():
                if token_id < vocab_size:
                    bias_rows.append(i)
                    bias_ids.append(token_id)
                    bias_values.append(bias)
            if p.allowed_token_ids is not None:
                allowed_rows.append(i)
                for token_id in p.allowed_token_ids:
                    if token_id < vocab_size:
                        allowed_pairs[0].append(i)
                        allowed_pairs[1].append(token_id)
            if p.bad_words_token_ids:
                assert row.pending_index is None or all(len(seq) == 1 for seq in p.bad_words_token_ids), \
                    "a multi-token bad word needs the row's latest token on the host"
                self.bad_words_token_ids[i] = p.bad_words_token_ids
            if row.num_output_tokens < p.min_tokens:
                banned = [t for t in p.all_stop_token_ids(row.eos_token_id) if t < vocab_size]
                if banned:
                    self.min_tokens[i] = banned
        if bias_rows:
            self.logit_bias = (
                to_device(torch.tensor(bias_rows, dtype=torch.int64), device),
                to_device(torch.tensor(bias_ids, dtype=torch.int64), device),
                to_device(torch.tensor(bias_values, dtype=torch.float32), device),
            )
        if allowed_rows:
            self.allowed_token_ids = tuple(  # type: ignore[assignment]
                to_device(torch.tensor(v, dtype=torch.int64), device) for v in (allowed_rows, *allowed_pairs))


def _f32(values: list[float], device: torch.device | str) -> torch.Tensor:
    return to_device(torch.tensor(values, dtype=torch.float32), device)


def _pad(seqs: list[list[int]], pad_id: int, device: torch.device | str, width: int = 0) -> torch.Tensor:
    """Right-pad token lists into [len(seqs), max(width, max_len)] int64 (at least one column)."""
    width = max(1, width, max(len(s) for s in seqs))
    out = np.full((len(seqs), width), pad_id, dtype=np.int64)
    for i, seq in enumerate(seqs):
        out[i, : len(seq)] = seq  # numpy converts a list ~8x faster than torch.tensor
    return to_device(torch.from_numpy(out), device)
