"""Per-request edits to the logits before sampling: allowed tokens, bad words, bias, min_tokens, penalties.

Each function edits `logits` [B, V] in place and returns it, reading one field of
`SamplingMetadata`; `apply_logits_processors` runs them in the sampler's order. They work on
the whole batch with one tensor op each; where a rule depends on the host-side token lists
(bad words, min_tokens) the host only gathers (row, token) pairs and the ban is one index op.
"""

from __future__ import annotations

import torch

from kiln.sampling.metadata import SamplingMetadata
from kiln.transfer import to_device


def has_logits_processors(metadata: SamplingMetadata) -> bool:
    """Whether any of steps 2-6 would change a logit in this batch."""
    return (metadata.allowed_token_ids is not None or bool(metadata.bad_words_token_ids)
            or metadata.logit_bias is not None or bool(metadata.min_tokens) or not metadata.no_penalties)


def apply_logits_processors(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    """Steps 2-6 of `Sampler`: allowed_token_ids, bad words, logit_bias, min_tokens, penalties."""
    if metadata.allowed_token_ids is not None:
        apply_allowed_token_ids(logits, *metadata.allowed_token_ids)
    if metadata.bad_words_token_ids:
        apply_bad_words(logits, metadata.bad_words_token_ids, metadata.output_token_ids)
    if metadata.logit_bias is not None:
        rows, token_ids, biases = metadata.logit_bias
        logits.index_put_((rows, token_ids), biases, accumulate=True)
    if metadata.min_tokens:
        apply_min_tokens(logits, metadata.min_tokens)
    if not metadata.no_penalties:
        assert metadata.repetition_penalties is not None and metadata.prompt_token_ids is not None
        assert metadata.frequency_penalties is not None and metadata.presence_penalties is not None
        assert metadata.output_token_ids_padded is not None
        apply_penalties(
            logits, metadata.prompt_token_ids, metadata.output_token_ids_padded,
            metadata.presence_penalties, metadata.frequency_penalties, metadata.repetition_penalties,
        )
    return logits


def apply_allowed_token_ids(logits: torch.Tensor, rows: torch.Tensor, pair_rows: torch.Tensor,
                            pair_token_ids: torch.Tensor) -> torch.Tensor:
    """Restricted rows keep only their listed tokens: the listed logits are saved, the rows set to
    -inf, and the saved values put back (no [B, V] mask to build each step)."""
    kept = logits[pair_rows, pair_token_ids]
    logits[rows] = float("-inf")
    logits[pair_rows, pair_token_ids] = kept
    return logits


def _ban(logits: torch.Tensor, rows: list[int], token_ids: list[int]) -> None:
    if rows:
        index = to_device(torch.tensor([rows, token_ids], dtype=torch.int64), logits.device)
        logits[index[0], index[1]] = float("-inf")


def apply_bad_words(
    logits: torch.Tensor, bad_words_token_ids: dict[int, list[list[int]]], output_token_ids: list[list[int]]
) -> torch.Tensor:
    """Ban a bad word's last token where the tokens generated so far end with the rest of it."""
    vocab_size = logits.shape[1]
    rows: list[int] = []
    token_ids: list[int] = []
    for row, sequences in bad_words_token_ids.items():
        past = output_token_ids[row]
        for seq in sequences:
            prefix_len = len(seq) - 1
            if prefix_len > len(past) or seq[-1] >= vocab_size:
                continue
            if prefix_len == 0 or past[-prefix_len:] == seq[:-1]:
                rows.append(row)
                token_ids.append(seq[-1])
    _ban(logits, rows, token_ids)
    return logits


def apply_min_tokens(logits: torch.Tensor, min_tokens: dict[int, list[int]]) -> torch.Tensor:
    """Ban EOS and the stop token ids of the rows still short of min_tokens (`SamplingMetadata.min_tokens`)."""
    rows: list[int] = []
    token_ids: list[int] = []
    for row, banned in min_tokens.items():
        rows.extend([row] * len(banned))
        token_ids.extend(banned)
    _ban(logits, rows, token_ids)
    return logits


def apply_penalties(
    logits: torch.Tensor,
    prompt_token_ids: torch.Tensor,  # [B, P], padded with vocab_size
    output_token_ids: torch.Tensor,  # [B, O], padded with vocab_size
    presence_penalties: torch.Tensor,  # [B]
    frequency_penalties: torch.Tensor,  # [B]
    repetition_penalties: torch.Tensor,  # [B]
) -> torch.Tensor:
    """vLLM's penalties.

    Repetition: a token seen in the prompt or the output has its logit divided by the penalty
    when positive and multiplied by it otherwise. Then, on output tokens only, subtract
    frequency_penalty * count and presence_penalty.

    Only the tokens a row has seen change, so the work is on their [B, P + O] ids, not on [B, V]
    (vLLM counts every row over the whole vocabulary: on the 2-core AVX2 host, 64 rows of a 49k
    vocabulary took 50-90 ms a step that way, ~1 ms this way). The values are those of the dense formulas,
    float32 operation for operation; a token listed twice gets the same value written twice.
    """
    seen = torch.cat((prompt_token_ids, output_token_ids), dim=1)
    index, has_tokens = _fill_padding(seen, logits.shape[1])
    before = logits.gather(1, index)
    penalty = repetition_penalties.unsqueeze(1)
    after = torch.where(before > 0, before / penalty, before * penalty)
    logits.scatter_(1, index, torch.where(has_tokens, after, before))

    index, has_tokens = _fill_padding(output_token_ids, logits.shape[1])
    ordered = output_token_ids.sort(dim=1).values
    counts = torch.searchsorted(ordered, index, right=True) - torch.searchsorted(ordered, index)
    before = logits.gather(1, index)
    after = before - frequency_penalties.unsqueeze(1) * counts
    after -= presence_penalties.unsqueeze(1)
    logits.scatter_(1, index, torch.where(has_tokens, after, before))
    return logits


def _fill_padding(token_ids: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_ids` [B, L] (padded with vocab_size) with each padding entry replaced by a token of its
    own row (its smallest), so writing a value per entry writes every token's value once or
    repeats it; and [B, 1] whether the row has any token (a row without rewrites token 0 unchanged)."""
    smallest = token_ids.min(dim=1, keepdim=True).values
    has_tokens = smallest < vocab_size
    filler = torch.where(has_tokens, smallest, 0)
    return torch.where(token_ids < vocab_size, token_ids, filler), has_tokens
