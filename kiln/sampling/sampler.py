"""The sampler: one token per row from the last-position logits, plus the logprobs asked for.

Owned by the model runner (one instance per runner, no state). It must not look at requests:
everything it knows comes from `SamplingMetadata`. It never syncs with the host (`.item()`,
`.tolist()`), except that each seeded row draws its own noise from its own generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kiln.core.outputs import LogprobsLists
from kiln.model.layers import native
from kiln.sampling.logits_processors import apply_logits_processors, has_logits_processors
from kiln.sampling.metadata import SamplingMetadata


@dataclass(slots=True)
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [B] int64
    logprob_token_ids: torch.Tensor | None  # [B, k + 1] int64: sampled token, then the top k
    logprobs: torch.Tensor | None  # [B, k + 1] float32, aligned with logprob_token_ids
    sampled_token_ranks: torch.Tensor | None  # [B] int64, 1 = most likely


class Sampler(nn.Module):
    """Samples one token per row, following vLLM V1's order of operations.

    1. Logprobs, if any row asked, are of the raw logits, before anything below (read in 11).
    2. allowed_token_ids: every other token is masked out.
    3. Bad words: a bad word's last token is banned where the generated tokens end with the rest.
    4. logit_bias is added.
    5. min_tokens: EOS and stop_token_ids are banned while a row is shorter than min_tokens.
    6. Penalties: repetition (prompt and output), then frequency and presence (output).
    7. Greedy rows take the argmax here; if every row is greedy, skip to 11.
    8. Temperature divides the logits (greedy rows use 1 and are discarded in 10; skipped when
       every row's is 1).
    9. min_p, then top-k and top-p (one sort when both are used).
    10. Softmax and inverse-CDF draw: one uniform number per row picks the token where the running
        sum of probabilities crosses it; a seeded row draws its number from its own generator, so
        its token does not depend on the rest of the batch. Greedy rows keep step 7.
    11. Logprobs are gathered: the sampled token first, then the top k, with its rank.

    `logits` ([B, V]) is modified in place.
    """

    def forward(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        if metadata.all_greedy and metadata.max_num_logprobs is None and not has_logits_processors(metadata):
            return SamplerOutput(greedy_argmax(logits), None, None, None)
        raw = logits
        logits = logits.to(torch.float32)
        if metadata.max_num_logprobs is not None and logits is raw:
            logits = logits.clone()  # edited in place below; the logprobs read the raw values
        logits = apply_logits_processors(logits, metadata)
        sampled = self.sample(logits, metadata)
        if metadata.max_num_logprobs is None:
            return SamplerOutput(sampled, None, None, None)
        return SamplerOutput(sampled, *compute_logprobs(raw, metadata.max_num_logprobs, sampled))

    def sample(self, logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        """Steps 7-10 on already processed logits: [B, V] -> [B] int64."""
        greedy = None
        if not metadata.all_random:
            greedy = greedy_argmax(logits)
            if metadata.all_greedy:
                return greedy
        if metadata.temperature is not None:
            logits.div_(metadata.temperature.unsqueeze(1))
        if metadata.min_p is not None:
            apply_min_p(logits, metadata.min_p)
        apply_top_k_top_p(logits, metadata.top_k, metadata.top_p, metadata.max_top_k)
        sampled = random_sample(logits, metadata.generators)
        if greedy is not None:
            assert metadata.greedy_mask is not None
            sampled = torch.where(metadata.greedy_mask, greedy, sampled)
        return sampled


def greedy_argmax(logits: torch.Tensor) -> torch.Tensor:
    """argmax over each row of logits [B, V] -> [B] int64. Raw bfloat16 logits need no float32 copy
    first (the widening is exact, so the answer is the same). On CPU through the native row argmax:
    a 64 x 49k batch in bfloat16 took torch 2 ms on the AVX512 host and 8 on the AVX2 one, the
    kernel 0.13 and 0.24; in float32 (rows processed for penalties, mixed batches) torch 4.4 ms on
    the AVX2 host."""
    argmax = native.argmax_rows(logits)
    return argmax(logits) if argmax is not None else logits.argmax(dim=-1)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens whose probability is below min_p times the row's top probability. A token's
    probability over the top one is exp(x - max), so the test is x < max + log(min_p), on the
    logits, with no softmax; min_p = 0 gives -inf: no cut. On CPU the native kernel does it in two
    passes over each row (a whole sampler step of 64 x 49k rows on the AVX2 host: ~12 ms with the
    softmax formulation, ~3 with the kernel)."""
    if (native_filter := native.min_p_rows(logits)) is not None:
        native_filter(logits, min_p)
        return logits
    threshold = logits.amax(dim=-1, keepdim=True) + min_p.log().unsqueeze(1)  # [B, 1]
    return logits.masked_fill_(logits < threshold, float("-inf"))


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None, max_top_k: int
) -> torch.Tensor:
    """Keep each row's top_k tokens (ties with the k-th kept), then its smallest top-p nucleus.

    Disabled rows hold top_k = V and top_p = 1. On CPU the native filter does both without sorting
    rows (sampling.cpp). Here, top-k alone uses topk(max_top_k) instead of a full sort; top-p needs
    the sort, and then top-k reads its threshold from the same sort.
    """
    if top_k is None and top_p is None:
        return logits
    if (native_filter := native.top_k_top_p_rows(logits)) is not None:
        native_filter(logits, top_k, top_p)
        return logits
    if top_p is None:
        assert top_k is not None
        vocab_size = logits.shape[1]
        top_values = logits.topk(max_top_k, dim=-1).values  # [B, max_top_k]
        kth = top_values.gather(1, (top_k.clamp(max=max_top_k) - 1).unsqueeze(1))  # [B, 1]
        kth.masked_fill_((top_k >= vocab_size).unsqueeze(1), float("-inf"))
        return logits.masked_fill_(logits < kth, float("-inf"))
    sorted_logits, order = logits.sort(dim=-1)  # ascending
    if top_k is not None:
        kth = sorted_logits.gather(1, (logits.shape[1] - top_k).unsqueeze(1))  # [B, 1]
        sorted_logits.masked_fill_(sorted_logits < kth, float("-inf"))
    cum_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    outside = cum_probs <= (1.0 - top_p).unsqueeze(1)
    outside[:, -1] = False  # the top token always stays
    sorted_logits.masked_fill_(outside, float("-inf"))
    return logits.scatter_(1, order, sorted_logits)


def random_sample(logits: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """One draw per row from softmax(`logits`) [B, V] -> [B]: the first token whose cumulative
    probability exceeds u * total, u ~ Uniform[0, 1).

    vLLM races exponential noise (argmax(probs / E)), which needs a random number per vocabulary
    entry; torch draws those serially on CPU (60 ms for 64 rows of 49k), while the float64 running
    sum and one number per row take ~2 ms. The distribution is the same. A token of probability 0
    is never picked: its running sum equals its predecessor's, so the predecessor crosses first.
    On CPU the native kernel draws from the logits without materializing the probabilities (the
    same distribution, not bitwise the same picks: its exp and sums round differently).
    """
    uniform = torch.empty(logits.shape[0], 1, dtype=torch.float64, device=logits.device)
    if len(generators) != logits.shape[0]:
        uniform.uniform_()
    for row, generator in generators.items():
        uniform[row].uniform_(generator=generator)
    if (draw := native.softmax_draw_rows(logits)) is not None:
        return draw(logits, uniform.squeeze(1))
    return inverse_cdf_rows(torch.softmax(logits, dim=-1), uniform.squeeze(1))


def inverse_cdf_rows(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """probs [B, V], uniform [B] float64 -> [B] int64: the first token whose float64 running sum
    exceeds u * total (the torch path)."""
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)  # float64: no drift over a long vocabulary
    picked = torch.searchsorted(cdf, uniform[:, None] * cdf[:, -1:], right=True)
    # u * total may round up to total itself; then the last token of nonzero probability (the
    # first to reach the total) is the one the draw meant.
    return torch.minimum(picked, cdf.argmax(dim=-1, keepdim=True)).squeeze(1)


def compute_logprobs(
    logits: torch.Tensor, num_logprobs: int, token_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`gather_logprobs` of the log-softmax of raw `logits` [N, V] (any float dtype). On CPU the
    native kernel works on the logits row by row and never builds the [N, V] log-softmax (its sum
    of exps rounds differently from torch's, so values may differ in the last bits); rows it
    declines (NaN or +inf logits) and other devices take the torch path."""
    k = logits.shape[1] if num_logprobs == -1 else min(num_logprobs, logits.shape[1])
    if (kernel := native.logprobs_rows(logits)) is None:
        return gather_logprobs(torch.log_softmax(logits.float(), dim=-1), k, token_ids)
    ids, lps, ranks = kernel(logits, k, token_ids.to(torch.int64))
    declined = (ranks == 0).nonzero().squeeze(1)
    if declined.numel():
        ids[declined], lps[declined], ranks[declined] = gather_logprobs(
            torch.log_softmax(logits[declined].float(), dim=-1), k, token_ids[declined])
    return ids, lps, ranks


def gather_logprobs(
    logprobs: torch.Tensor, num_logprobs: int, token_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each row of `logprobs` [N, V]: the chosen token and the top `num_logprobs` (-1: all V).

    Returns ids [N, k + 1] int64 and logprobs [N, k + 1] (column 0: `token_ids` [N]), and the
    chosen token's rank [N] int64 (1 = most likely; ties count against it, as in vLLM).
    """
    k = logprobs.shape[1] if num_logprobs == -1 else min(num_logprobs, logprobs.shape[1])
    top_logprobs, top_ids = logprobs.topk(k, dim=-1)  # [N, k]
    token_ids = token_ids.to(torch.int64).unsqueeze(1)  # [N, 1]
    token_logprobs = logprobs.gather(1, token_ids)  # [N, 1]
    ranks = (logprobs >= token_logprobs).sum(dim=-1)
    return torch.cat((token_ids, top_ids), dim=1), torch.cat((token_logprobs, top_logprobs), dim=1), ranks


def to_logprobs_lists(
    token_ids: torch.Tensor, logprobs: torch.Tensor, ranks: torch.Tensor, num_logprobs: int | None = None
) -> LogprobsLists:
    """Host lists from `gather_logprobs` output (or a row slice of it), keeping 1 + num_logprobs columns.

    `num_logprobs` is the request's own k when the batch gathered more (None or -1: keep all).
    """
    if num_logprobs is not None and num_logprobs != -1:
        token_ids = token_ids[:, : num_logprobs + 1]
        logprobs = logprobs[:, : num_logprobs + 1]
    return LogprobsLists(token_ids=token_ids.tolist(), logprobs=logprobs.tolist(), ranks=ranks.tolist())
