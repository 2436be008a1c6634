"""The sampler against hand-computed oracles on tiny vocabularies."""

from __future__ import annotations

import math

import pytest
import torch

from kiln.sampling.logits_processors import apply_logits_processors, apply_penalties
from kiln.sampling.metadata import SamplingMetadata, SamplingRow
from kiln.sampling.params import SamplingParams
from kiln.sampling.sampler import (
    Sampler,
    SamplerOutput,
    apply_min_p,
    compute_logprobs,
    gather_logprobs,
    to_logprobs_lists,
)

# A 6-token distribution with distinct probabilities (sorted: 1, 3, 4, 2, 5, 0).
PROBS = [0.04, 0.30, 0.11, 0.25, 0.20, 0.10]
V = len(PROBS)


def row(
    params: SamplingParams | None = None,
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    seed: int | None = None,
    eos: int | None = None,
) -> SamplingRow:
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return SamplingRow(params or SamplingParams(), prompt or [0], output if output is not None else [],
                       generator, eos)


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
    metadata = SamplingMetadata.build(rows, logits.shape[1], "cpu")
    return Sampler()(logits.clone(), metadata)


def base_logits(num_rows: int) -> torch.Tensor:
    return torch.tensor(PROBS).log().expand(num_rows, V).contiguous()


def counts_of(tokens: torch.Tensor) -> list[int]:
    return torch.bincount(tokens, minlength=V).tolist()


def assert_distribution(tokens: torch.Tensor, expected: dict[int, float]) -> None:
    """Tokens outside `expected` never occur; each count lies within 5 sigma of its binomial mean."""
    n = tokens.numel()
    total = sum(expected.values())
    for token, count in enumerate(counts_of(tokens)):
        q = expected.get(token, 0.0) / total
        if q == 0.0:
            assert count == 0, f"token {token} is outside the allowed set but was sampled {count} times"
        else:
            sigma = math.sqrt(n * q * (1 - q))
            assert abs(count - n * q) <= 5 * sigma + 1, f"token {token}: {count} vs expected {n * q:.0f}"


# ---- greedy --------------------------------------------------------------------------------
def test_greedy_is_argmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, 50)
    out = sample(logits, [row(SamplingParams(temperature=0.0)) for _ in range(8)])
    assert torch.equal(out.sampled_token_ids, logits.argmax(dim=-1))
    assert out.sampled_token_ids.dtype == torch.int64
    assert out.logprobs is None and out.logprob_token_ids is None and out.sampled_token_ranks is None


def test_mixed_batch_greedy_rows_stay_argmax() -> None:
    """Greedy rows in a batch with random rows (temperature, top-k) still take the argmax."""
    torch.manual_seed(1)
    logits = torch.randn(6, 40)
    rows = [row(SamplingParams(temperature=0.0 if i % 2 == 0 else 1.5, top_k=3 if i % 2 else 0))
            for i in range(6)]
    out = sample(logits, rows)
    assert torch.equal(out.sampled_token_ids[0::2], logits[0::2].argmax(dim=-1))
    for i in (1, 3, 5):
        assert out.sampled_token_ids[i].item() in logits[i].topk(3).indices.tolist()


def test_fast_path_builds_no_extra_tensors() -> None:
    """All-greedy batches build no per-row tensors; plain random ones only a temperature other than
    1 (dividing by 1 changes no logit), which a mixed batch's greedy rows hold as 1."""
    greedy = SamplingMetadata.build([row(SamplingParams(temperature=0.0))] * 3, V, "cpu")
    assert greedy.all_greedy and greedy.temperature is None and greedy.no_penalties
    plain = SamplingMetadata.build([row()] * 3, V, "cpu")
    assert plain.all_random and not plain.all_greedy and plain.temperature is None
    mixed = SamplingMetadata.build([row(SamplingParams(temperature=0.0)), row(SamplingParams(temperature=0.5))], V, "cpu")
    assert mixed.temperature is not None and mixed.temperature.tolist() == [1.0, 0.5]
    assert plain.top_k is None and plain.top_p is None and plain.min_p is None
    assert plain.prompt_token_ids is None and plain.logit_bias is None and plain.allowed_token_ids is None
    assert plain.max_num_logprobs is None and plain.generators == {}


# ---- filters: allowed sets and distributions ---------------------------------------------------
N = 20000

FILTER_CASES = [
    # params, expected surviving tokens with their unnormalized probabilities
    (SamplingParams(), dict(enumerate(PROBS))),
    (SamplingParams(temperature=0.5), {i: p ** 2 for i, p in enumerate(PROBS)}),
    (SamplingParams(top_k=3), {1: 0.30, 3: 0.25, 4: 0.20}),
    (SamplingParams(top_k=1), {1: 1.0}),
    (SamplingParams(top_p=0.5), {1: 0.30, 3: 0.25}),
    (SamplingParams(top_p=0.7), {1: 0.30, 3: 0.25, 4: 0.20}),
    (SamplingParams(min_p=0.5), {1: 0.30, 3: 0.25, 4: 0.20}),
    (SamplingParams(min_p=0.7), {1: 0.30, 3: 0.25}),
    # top-p applies to the top-k survivors renormalized: 0.4, 0.733, 1.0 cumulative.
    (SamplingParams(top_k=3, top_p=0.8), {1: 0.30, 3: 0.25, 4: 0.20}),
    (SamplingParams(top_k=3, top_p=0.7), {1: 0.30, 3: 0.25}),
    # Temperature comes first: at T=0.5 the probabilities are p^2 / 0.2222 = .405, .281, .180, ...
    (SamplingParams(temperature=0.5, top_p=0.6), {1: 0.09, 3: 0.0625}),
]


def native_kernel(name: str):
    """The native sampling kernel `name` of kiln.model.layers.native (for float32 CPU rows), or a skip."""
    from kiln.model.layers import native

    kernel = getattr(native, name)(torch.ones(1, 1))
    if kernel is None:
        pytest.skip("the native kernels could not be built here")
    return kernel


def native_or_torch(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, name: str) -> str:
    """For a fixture parametrized over "native" and "torch": keep the native kernel `name` (skipping
    where it is not built), or make the sampler take its torch path."""
    from kiln.model.layers import native

    if request.param == "torch":
        monkeypatch.setattr(native, name, lambda tensor: None)
    else:
        native_kernel(name)
    return request.param


@pytest.fixture(params=["native", "torch"])
def filter_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Filter top-k / top-p through the native kernel (sampling.cpp), or through the torch sort."""
    return native_or_torch(request, monkeypatch, "top_k_top_p_rows")


@pytest.mark.parametrize(("params", "expected"), FILTER_CASES)
def test_filters_allowed_set_and_distribution(params: SamplingParams, expected: dict[int, float],
                                              filter_path: str) -> None:
    torch.manual_seed(1234)
    out = sample(base_logits(N), [row(params) for _ in range(N)])
    assert_distribution(out.sampled_token_ids, expected)


@pytest.fixture(params=["native", "torch"])
def min_p_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    return native_or_torch(request, monkeypatch, "min_p_rows")


def test_min_p_cuts_what_the_softmax_formulation_cuts(min_p_path: str) -> None:
    """min_p on the logits (x < max + log(min_p)) against vLLM's formulation on probabilities
    (p < min_p * max p), rows with min_p 0 (no cut) and with -inf entries included."""
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 500, generator=gen) * 4
    logits[2, :100] = float("-inf")
    min_p = torch.tensor([0.0, 0.01, 0.05, 0.1, 0.5, 1.0])
    probs = torch.softmax(logits, dim=-1)
    expected = probs < probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    cut = torch.isinf(apply_min_p(logits.clone(), min_p)) & torch.isfinite(logits)
    assert torch.equal(cut, expected & torch.isfinite(logits))
    assert not cut[0].any() and cut[5].sum() == 499  # min_p 1 keeps only the top token


def test_filters_per_row_in_one_batch(filter_path: str) -> None:
    """Different filters on different rows of one batch each give their own allowed set."""
    torch.manual_seed(5)
    per_case = 2000
    cases = FILTER_CASES[2:8]
    rows = [row(params) for params, _ in cases for _ in range(per_case)]
    out = sample(base_logits(len(rows)), rows)
    for c, (_, expected) in enumerate(cases):
        tokens = out.sampled_token_ids[c * per_case:(c + 1) * per_case]
        assert set(tokens.tolist()) <= set(expected), f"case {c}"


def test_top_k_larger_than_vocab_is_off(filter_path: str) -> None:
    torch.manual_seed(2)
    out = sample(base_logits(N), [row(SamplingParams(top_k=100)) for _ in range(N)])
    assert_distribution(out.sampled_token_ids, dict(enumerate(PROBS)))


def _exact_filter(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition in float64: top-k keeps values at or above the k-th largest; top-p then keeps
    each survivor whose more probable survivors (equal ones: lower index first) hold less than
    top_p of the survivors' mass. Returns (kept, near_cut): near_cut marks tokens whose mass above
    lies within 1e-6 of top_p, which float32 probabilities may place on either side."""
    x = logits.double()
    vocab = x.shape[1]
    kth = x.sort(dim=-1, descending=True).values.gather(1, (top_k.clamp(max=vocab) - 1)[:, None])
    kth[top_k >= vocab] = float("-inf")
    x = x.masked_fill(x < kth, float("-inf"))
    sorted_probs, order = torch.softmax(x, dim=-1).sort(dim=-1, descending=True, stable=True)
    above = sorted_probs.cumsum(dim=-1) - sorted_probs
    p = top_p.double()[:, None]
    keep = (above < p) | (p >= 1)
    near = ((above - p).abs() < 1e-6) & (p < 1)
    kept = torch.zeros_like(keep).scatter_(1, order, keep) & torch.isfinite(x)
    near_cut = torch.zeros_like(near).scatter_(1, order, near)
    return kept, near_cut


def test_native_top_k_top_p_keeps_the_exact_nucleus() -> None:
    """The native filter on SmolLM2-sized rows against the float64 definition: mixed rows (top-k
    only, top-p only, both, neither), tokens already masked, ties at the k-th value, a peaked row
    whose nucleus is one token and a flat one whose nucleus is most of the vocabulary; small and
    large k (the kernel bounds small k by the maxima of spans of the row, large k by a heap)."""
    kernel = native_kernel("top_k_top_p_rows")
    gen = torch.Generator().manual_seed(0)
    rows, vocab = 48, 49152
    logits = torch.randn(rows, vocab, generator=gen) * 3
    logits[:, ::7] = float("-inf")
    logits[0, 100:300], logits[1, 100:300] = 9.0, 9.0  # 200 tied values around the k-th
    logits[2] *= 20  # peaked
    logits[3] *= 0.01  # nearly flat
    top_k = torch.randint(1, 3000, (rows,), generator=gen)
    top_k[1::4], top_k[3::4] = vocab, vocab + 5
    top_k[0], top_k[1] = 250, 250
    top_k[4:12] = torch.tensor([1, 2, 20, 50, 100, 192, 193, 40])  # small k: bounded by the spans' maxima
    logits[5, 1000:1100] = 9.0  # 100 tied at the top and k = 2: all of them survive top-k
    top_p = 0.05 + 0.94 * torch.rand(rows, generator=gen)
    top_p[::3] = 1.0
    top_p[0], top_p[2], top_p[3] = 1.0, 0.9, 0.9
    got = logits.clone()
    kernel(got, top_k, top_p)
    kept, near_cut = _exact_filter(logits, top_k, top_p)
    got_kept = torch.isfinite(got)
    assert torch.equal(got[got_kept], logits[got_kept]), "kept logits must stay as they were"
    assert torch.equal(got_kept & ~near_cut, kept & ~near_cut)
    assert int(near_cut.sum()) <= 2
    at_or_above_ties = int((logits[0] >= 9.0).sum())
    assert int((logits[0] > 9.0).sum()) < 250 < at_or_above_ties == int(got_kept[0].sum())  # ties at the k-th kept
    assert int(got_kept[2].sum()) < 5 and int(got_kept[3].sum()) > vocab // 2


def test_native_filter_cuts_nan_logits() -> None:
    """A broken model's NaN logits are cut from filtered rows (sorting them would have no order)
    and the rest filters as usual."""
    kernel = native_kernel("top_k_top_p_rows")
    logits = torch.randn(3, 9000, generator=torch.Generator().manual_seed(1)) * 0.01
    logits[:, ::3] = float("nan")
    kernel(logits, torch.tensor([9000, 20, 9000]), torch.tensor([0.5, 1.0, 1.0]))
    assert not logits[:2].isnan().any() and logits[2].isnan().sum() == 3000  # the last row is not filtered
    assert 0 < int(torch.isfinite(logits[0]).sum()) < 6000 and int(torch.isfinite(logits[1]).sum()) == 20


# ---- seeds ---------------------------------------------------------------------------------
def test_seeded_row_independent_of_batch() -> None:
    """A seeded row samples the same token alone or in any batch, whatever the global RNG state."""
    torch.manual_seed(0)
    vocab = 64
    target_logits = torch.randn(vocab) * 0.5
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=11)
    seen = set()
    for seed in range(20):
        torch.manual_seed(100 + seed)
        alone = sample(target_logits[None], [row(params, seed=seed)]).sampled_token_ids.item()
        seen.add(alone)
        others = [
            (torch.randn(vocab), row(SamplingParams(temperature=0.7))),
            (torch.randn(vocab), row(SamplingParams(temperature=1.3, top_k=5, seed=3), seed=999)),
            (torch.randn(vocab), row(SamplingParams(temperature=0.0))),
            (torch.randn(vocab), row(SamplingParams(presence_penalty=1.0, logprobs=3), output=[1, 2])),
        ]
        for position in range(len(others) + 1):
            torch.manual_seed(7 * position + seed)
            batch = others[:position] + [(target_logits, row(params, seed=seed))] + others[position:]
            logits = torch.stack([lg for lg, _ in batch])
            out = sample(logits, [r for _, r in batch])
            assert out.sampled_token_ids[position].item() == alone, (seed, position)
    assert len(seen) > 3, "seeds should give different tokens on a flat distribution"


def test_seeded_rows_follow_the_distribution(filter_path: str) -> None:
    """Rows with their own generators (one seed each) still sample from the filtered distribution."""
    num = 4000
    rows = [row(SamplingParams(top_k=3, seed=s), seed=s) for s in range(num)]
    out = sample(base_logits(num), rows)
    assert_distribution(out.sampled_token_ids, {1: 0.30, 3: 0.25, 4: 0.20})


def test_greedy_row_with_seed_has_no_generator_entry() -> None:
    metadata = SamplingMetadata.build([row(SamplingParams(temperature=0.0, seed=1), seed=1), row()], V, "cpu")
    assert metadata.generators == {}


# ---- logits processors -----------------------------------------------------------------------
def processed(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    metadata = SamplingMetadata.build(rows, logits.shape[1], "cpu")
    return apply_logits_processors(logits.clone(), metadata)


def test_penalties_match_hand_computation() -> None:
    """Repetition on prompt+output tokens (divide positive, multiply negative), then frequency and presence
    on output counts; a row without penalties in the same batch is untouched."""
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 1.0], [2.0, -1.0, 0.5, -0.5, 1.0]])
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.3)
    rows = [row(params, prompt=[0, 1], output=[2, 2, 3]), row(prompt=[0, 1, 2, 3, 4], output=[4, 4])]
    expected = torch.tensor([
        [
            2.0 / 2,  # prompt token, positive: divided
            -1.0 * 2,  # prompt token, negative: multiplied
            0.5 / 2 - 0.5 * 2 - 0.3,  # output twice
            -0.5 * 2 - 0.5 * 1 - 0.3,  # output once
            1.0,  # unseen
        ],
        [2.0, -1.0, 0.5, -0.5, 1.0],
    ])
    torch.testing.assert_close(processed(logits, rows), expected)


def _dense_penalties(logits: torch.Tensor, prompt: torch.Tensor, output: torch.Tensor, presence: torch.Tensor,
                     frequency: torch.Tensor, repetition: torch.Tensor) -> torch.Tensor:
    """vLLM's formulation, every row counted over the whole vocabulary: the oracle of the sparse one."""
    vocab_size = logits.shape[1]

    def bin_counts(ids: torch.Tensor) -> torch.Tensor:
        counts = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.int64)
        return counts.scatter_add_(1, ids, torch.ones_like(ids))[:, :vocab_size]

    output_counts = bin_counts(output)
    seen = (bin_counts(prompt) > 0) | (output_counts > 0)
    penalty = torch.where(seen, repetition.unsqueeze(1), 1.0)
    logits = torch.where(logits > 0, logits / penalty, logits * penalty)
    logits -= frequency.unsqueeze(1) * output_counts
    logits -= presence.unsqueeze(1) * (output_counts > 0)
    return logits


@pytest.mark.parametrize("seed", range(4))
def test_penalties_equal_the_dense_formulation(seed: int) -> None:
    """Random rows with repeated tokens, padding, rows without penalties or without outputs, and
    penalties of both signs: the same float32 values as counting over the whole vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    vocab, rows = 50, 7
    logits = torch.randn(rows, vocab, generator=generator) * 3
    logits[0, :5] = 0.0

    def padded(max_len: int, min_len: int) -> torch.Tensor:
        ids = torch.randint(0, vocab // 3, (rows, max_len), generator=generator)  # small range: repeats
        lengths = torch.randint(min_len, max_len + 1, (rows,), generator=generator)
        return ids.masked_fill_(torch.arange(max_len) >= lengths.unsqueeze(1), vocab)

    prompt, output = padded(12, 1), padded(9, 0)
    output[1] = vocab  # a row that has generated nothing yet
    prompt[2], output[2] = vocab, vocab  # a row without penalties contributes no tokens
    presence = torch.rand(rows, generator=generator) * 4 - 2
    frequency = torch.rand(rows, generator=generator) * 4 - 2
    repetition = torch.rand(rows, generator=generator) * 1.9 + 0.1
    presence[2], frequency[2], repetition[2] = 0.0, 0.0, 1.0
    expected = _dense_penalties(logits, prompt, output, presence, frequency, repetition)
    actual = apply_penalties(logits.clone(), prompt, output, presence, frequency, repetition)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_repetition_penalty_below_one_rewards() -> None:
    logits = torch.tensor([[1.0, -1.0, 1.0]])
    out = processed(logits, [row(SamplingParams(repetition_penalty=0.5), prompt=[0], output=[1])])
    torch.testing.assert_close(out, torch.tensor([[2.0, -0.5, 1.0]]))


def test_logit_bias() -> None:
    logits = torch.zeros(2, V)
    rows = [row(SamplingParams(logit_bias={"3": 5.0, 0: -2.0})), row()]
    expected = torch.zeros(2, V)
    expected[0, 3], expected[0, 0] = 5.0, -2.0
    torch.testing.assert_close(processed(logits, rows), expected)
    greedy = sample(base_logits(1), [row(SamplingParams(temperature=0.0, logit_bias={0: 100}))])
    assert greedy.sampled_token_ids.tolist() == [0]


def test_allowed_token_ids() -> None:
    torch.manual_seed(3)
    rows = [row(SamplingParams(allowed_token_ids=[0, 2])) for _ in range(2000)] + [row()]
    out = processed(base_logits(len(rows)), rows)
    assert torch.isinf(out[0, [1, 3, 4, 5]]).all() and torch.equal(out[0, [0, 2]], base_logits(1)[0, [0, 2]])
    assert torch.equal(out[-1], base_logits(1)[0])
    mixed = processed(base_logits(3), [row(), row(SamplingParams(allowed_token_ids=[4, 4, 1, 99])), row()])
    assert torch.equal(torch.isfinite(mixed[1]), torch.tensor([False, True, False, False, True, False]))
    assert torch.equal(mixed[1, [1, 4]], base_logits(1)[0, [1, 4]]) and torch.isfinite(mixed[[0, 2]]).all()
    tokens = sample(base_logits(len(rows)), rows).sampled_token_ids[:-1]
    assert_distribution(tokens, {0: 0.04, 2: 0.11})
    greedy = sample(base_logits(1), [row(SamplingParams(temperature=0.0, allowed_token_ids=[0, 5, 2]))])
    assert greedy.sampled_token_ids.tolist() == [2]


def test_bad_words() -> None:
    """A one-token bad word is always banned; a two-token one only right after its first token."""
    params = SamplingParams(bad_words=["x"])
    params._bad_words_token_ids = [[1], [3, 4]]  # as update_from_tokenizer would set them
    logits = torch.zeros(3, V)
    out = processed(logits, [row(params, output=[0, 3]), row(params, output=[3, 0]), row(params, output=[])])
    banned = [torch.isinf(r).nonzero().flatten().tolist() for r in out]
    assert banned == [[1, 4], [1], [1]]


def test_bad_words_steer_greedy() -> None:
    params = SamplingParams(temperature=0.0, bad_words=["x"])
    params._bad_words_token_ids = [[5, 1]]
    assert sample(base_logits(1), [row(params, output=[5])]).sampled_token_ids.tolist() == [3]
    assert sample(base_logits(1), [row(params, output=[2])]).sampled_token_ids.tolist() == [1]


def test_min_tokens_masks_eos_and_stop_ids_until_reached() -> None:
    logits = torch.tensor([[9.0, 8.0, 7.0, 1.0, 0.0, 0.0]]).expand(4, V)
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[1])
    rows = [
        row(params, output=[], eos=0),
        row(params, output=[3], eos=0),
        row(params, output=[3, 3], eos=0),  # reached: EOS allowed again
        row(SamplingParams(temperature=0.0, min_tokens=2, ignore_eos=True), output=[], eos=0),
    ]
    assert sample(logits, rows).sampled_token_ids.tolist() == [2, 2, 0, 0]


def test_pending_token_counts_as_if_it_were_on_the_host() -> None:
    """Asynchronous scheduling: a row's latest token, still on the device (`pending_index` into the
    previous step's sampled ids), counts for penalties and min_tokens exactly as the same token
    appended to its host list does."""
    penalized = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.3)
    short = SamplingParams(min_tokens=2, stop_token_ids=[1], presence_penalty=0.1)
    plain = SamplingParams()
    previous_step = torch.tensor([4, 2, 5])  # what the step before sampled, in its own row order
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 1.0, 0.25]]).expand(4, V).contiguous()
    on_host = [row(penalized, prompt=[0], output=[2, 3, 2]), row(penalized, prompt=[1], output=[5, 5]),
               row(short, output=[3, 4], eos=0), row(plain, output=[2])]
    pending = [row(penalized, prompt=[0], output=[2, 3]), row(penalized, prompt=[1], output=[5]),
               row(short, output=[3], eos=0), row(plain, output=[2])]
    for r, index in zip(pending, [1, 2, 0, None]):
        r.pending_index = index
    expected = processed(logits, on_host)
    metadata = SamplingMetadata.build(pending, V, "cpu", previous_step)
    torch.testing.assert_close(apply_logits_processors(logits.clone(), metadata), expected)
    assert metadata.min_tokens == {} and torch.isfinite(expected[2, [0, 1]]).all()  # two tokens: reached
    pending[2].pending_index = None  # one token only: EOS and the stop id stay banned
    assert SamplingMetadata.build(pending, V, "cpu", previous_step).min_tokens == {2: [1, 0]}


# ---- logprobs --------------------------------------------------------------------------------
def test_logprobs_are_raw_with_sampled_token_first() -> None:
    """Logprobs come from the raw logits (before bias, penalties, temperature, top-k); column 0 is the
    sampled token even when it is not in the top k; ranks are its 1-based rank in the raw distribution."""
    torch.manual_seed(0)
    logits = torch.randn(3, 30)
    rows = [
        row(SamplingParams(temperature=0.0, logprobs=2, logit_bias={int(logits[0].argmin()): 100.0})),
        row(SamplingParams(temperature=0.7, top_k=4, logprobs=0, repetition_penalty=1.5), output=[1, 2]),
        row(SamplingParams(presence_penalty=1.0)),
    ]
    out = sample(logits, rows)
    raw = torch.log_softmax(logits, dim=-1)
    assert out.logprob_token_ids is not None and out.logprobs is not None and out.sampled_token_ranks is not None
    assert out.logprob_token_ids.shape == (3, 3) and out.logprobs.shape == (3, 3)
    assert out.sampled_token_ids[0].item() == logits[0].argmin().item()
    assert torch.equal(out.logprob_token_ids[:, 0], out.sampled_token_ids)
    for i in range(3):
        ids = out.logprob_token_ids[i]
        torch.testing.assert_close(out.logprobs[i], raw[i, ids])
        torch.testing.assert_close(out.logprobs[i, 1:], raw[i].topk(2).values)
        expected_rank = 1 + int((raw[i] > raw[i, ids[0]]).sum())
        assert out.sampled_token_ranks[i].item() == expected_rank
    assert out.sampled_token_ranks[0].item() == 30


def test_logprobs_whole_vocabulary() -> None:
    logits = torch.randn(2, 7)
    out = sample(logits, [row(SamplingParams(logprobs=-1)), row(SamplingParams(logprobs=1))])
    assert out.logprobs is not None and out.logprobs.shape == (2, 8)
    torch.testing.assert_close(out.logprobs[:, 1:], torch.log_softmax(logits, -1).sort(-1, descending=True).values)


@pytest.mark.parametrize("k", [0, 1, 5, 20, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_logprobs_equal_the_log_softmax_path(k: int, dtype: torch.dtype) -> None:
    """compute_logprobs on CPU (the native kernel) against gather_logprobs of torch's log-softmax:
    the same ids and ranks, values within float32 rounding of the sum of exps; rows with -inf
    entries, a chosen token at -inf, and rows the kernel declines (NaN, +inf) included."""
    from kiln.model.layers import native

    if native.logprobs_rows(torch.ones(1, 1)) is None:
        pytest.skip("the native kernels could not be built here")
    gen = torch.Generator().manual_seed(k)
    rows, vocab = 9, 300
    # distinct values, exact in bfloat16 (ties would leave torch.topk's order free)
    logits = torch.stack([torch.randperm(vocab, generator=gen) for _ in range(rows)]).float().sub_(150).div_(8)
    logits[1, ::3] = float("-inf")
    logits[2, 7] = float("nan")
    logits[3, 11] = float("inf")
    logits = logits.to(dtype)
    chosen = torch.randint(0, vocab, (rows,), generator=gen)
    chosen[1] = 3  # a token at -inf: every token ranks at or above it
    chosen[4] = int(logits[4].float().argmax())  # the most likely: rank 1
    expected = gather_logprobs(torch.log_softmax(logits.float(), dim=-1), k, chosen)
    ids, lps, ranks = compute_logprobs(logits, k, chosen)
    declined = native.logprobs_rows(logits)(logits, k, chosen)[2] == 0  # left to the torch path
    assert declined.tolist() == [False, False, True, True] + [False] * 5 and ranks[4] == 1
    finite = 1 + min(k, 200)  # row 1's last 100 are tied at -inf, in no particular order
    assert torch.equal(ids[[0, 4, 5, 6, 7, 8]], expected[0][[0, 4, 5, 6, 7, 8]])
    assert torch.equal(ids[1, :finite], expected[0][1, :finite])
    assert torch.equal(ranks, expected[2]) and ranks[1] == vocab
    torch.testing.assert_close(lps, expected[1], rtol=1e-6, atol=1e-6, equal_nan=True)


def test_gather_logprobs_for_prompt_tokens() -> None:
    logprobs = torch.log_softmax(torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 1.0]]), dim=-1)
    ids, lps, ranks = gather_logprobs(logprobs, 2, torch.tensor([2, 0]))
    assert ids.tolist() == [[2, 1, 3], [0, 0, 3]]
    torch.testing.assert_close(lps, logprobs.gather(1, ids))
    assert ranks.tolist() == [3, 1]
    ids, lps, ranks = gather_logprobs(logprobs, -1, torch.tensor([2, 0]))
    assert ids.shape == (2, 5)


def test_to_logprobs_lists_slices_to_the_request_k() -> None:
    ids = torch.tensor([[4, 1, 2, 3], [0, 0, 1, 2]])
    lps = torch.tensor([[-3.0, -0.5, -1.0, -2.0], [-0.1, -0.1, -2.0, -3.0]])
    ranks = torch.tensor([5, 1])
    lists = to_logprobs_lists(ids[1:], lps[1:], ranks[1:], num_logprobs=1)
    assert lists.token_ids == [[0, 0]] and lists.ranks == [1]
    assert lists.logprobs == [pytest.approx([-0.1, -0.1])]
    full = to_logprobs_lists(ids, lps, ranks, num_logprobs=-1)
    assert full.token_ids == ids.tolist() and full.ranks == [5, 1]


@pytest.fixture(params=["native", "torch"])
def draw_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Draw through the native softmax-and-draw kernel, or through the torch path."""
    return native_or_torch(request, monkeypatch, "softmax_draw_rows")


def test_draw_at_the_ends_of_the_unit_interval_keeps_to_allowed_tokens(monkeypatch: pytest.MonkeyPatch,
                                                                       draw_path: str) -> None:
    """u * total can round up to the total itself (simulated: u = 1): the draw then takes the last
    token of nonzero probability, never a masked one after it (nor an index past the vocabulary);
    u = 0 takes the first token of nonzero probability."""
    from kiln.sampling import sampler as sampler_module

    logits = torch.tensor([[0.2, 0.0, 0.5, 0.3, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]]).log()
    monkeypatch.setattr(torch.Tensor, "uniform_", lambda self, *a, **k: self.fill_(1.0))
    assert sampler_module.random_sample(logits.clone(), {}).tolist() == [3, 5]
    monkeypatch.setattr(torch.Tensor, "uniform_", lambda self, *a, **k: self.fill_(0.0))
    assert sampler_module.random_sample(logits.clone(), {}).tolist() == [0, 5]


def test_native_draw_follows_the_softmax() -> None:
    """Stratified uniforms u = (j + 0.5) / N make the inverse-CDF draw a quadrature: token i must be
    drawn N * p_i times, give or take one at each end of its interval. Masked tokens (-inf, and
    NaN from a broken model) are never drawn, also in a row a top-k filter left mostly masked."""
    kernel = native_kernel("softmax_draw_rows")
    gen = torch.Generator().manual_seed(0)
    draws = 4000
    logits = torch.randn(3, 300, generator=gen) * 2
    logits[0, ::3] = float("-inf")
    logits[1, 7] = float("nan")
    logits[2, :] = float("-inf")
    logits[2, [5, 130, 131, 299]] = torch.tensor([0.0, 1.0, -1.0, 2.0])
    uniform = (torch.arange(draws, dtype=torch.float64) + 0.5) / draws
    for row in logits:
        picked = kernel(row.expand(draws, -1).contiguous(), uniform)
        probs = torch.softmax(row.nan_to_num(nan=float("-inf")).double(), dim=-1)
        counts = torch.bincount(picked, minlength=row.numel()).double()
        assert bool(((counts - draws * probs).abs() <= 2).all())
        assert bool((probs[picked] > 0).all())


def test_native_draw_picks_what_the_torch_path_picks_away_from_ties() -> None:
    """On SmolLM2-sized rows (dense, masked every fifth token, sparse after a top-k filter) the
    kernel's picks equal the torch path's, except where u * total falls within rounding of a
    boundary between two tokens (its exp and sums round differently), where it takes a neighbour."""
    from kiln.sampling import sampler as sampler_module

    kernel = native_kernel("softmax_draw_rows")
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(48, 49152, generator=gen) * 4
    logits[:24, ::5] = float("-inf")
    sparse = torch.full((24, 49152), float("-inf"))
    kept = torch.randint(0, 49152, (24, 40), generator=gen)
    sparse.scatter_(1, kept, torch.randn(24, 40, generator=gen))
    logits[24:] = sparse
    probs = torch.softmax(logits, dim=-1)
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)
    cdf /= cdf[:, -1:].clone()
    uniform = torch.rand(48, generator=gen, dtype=torch.float64)
    uniform[0], uniform[24] = 0.0, 0.0
    expected = sampler_module.inverse_cdf_rows(probs, uniform)
    got = kernel(logits, uniform)
    assert bool((probs.gather(1, got[:, None]) > 0).all())
    differ = (got != expected).nonzero().flatten().tolist()
    assert len(differ) <= 1, differ
    for r in differ:
        assert abs(float(cdf[r, min(int(got[r]), int(expected[r]))]) - float(uniform[r])) < 1e-5


def test_greedy_fast_path_on_bfloat16_logits_matches_argmax() -> None:
    """All-greedy batches without processors take the argmax of the raw (here bfloat16) logits,
    ties and NaN included, exactly as torch.argmax of the float32 logits picks."""
    torch.manual_seed(3)
    logits = torch.randint(-4, 4, (7, 300)).to(torch.bfloat16)  # many tied maxima
    logits[2, 5] = float("nan")
    logits[4] = float("-inf")
    logits[5, 290] = float("nan")  # in the tail past the last whole 64-element span
    logits[6, 299] = 9  # the maximum, last
    out = sample(logits, [row(SamplingParams(temperature=0.0)) for _ in range(7)])
    assert torch.equal(out.sampled_token_ids, logits.float().argmax(dim=-1))
    wide = torch.randn(3, 49152).to(torch.bfloat16)
    assert torch.equal(sample(wide, [row(SamplingParams(temperature=0.0))] * 3).sampled_token_ids,
                       wide.float().argmax(dim=-1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_native_argmax_finds_the_first_maximum_wherever_it_lies(dtype: torch.dtype) -> None:
    """The kernel keeps several vector maxima side by side and searches spans of many values: the
    first maximum (or NaN) must win whichever lane, span or tail it falls in, signed zeros
    counting as equal, as torch.argmax of the float32 logits decides."""
    from kiln.model.layers import native

    argmax_rows = native.argmax_rows(torch.ones(1, 1, dtype=dtype))
    if argmax_rows is None:
        pytest.skip("the native kernels could not be built here")
    gen = torch.Generator().manual_seed(5)
    for width in (1, 31, 32, 33, 95, 1000, 4099):
        logits = torch.randint(-3, 2, (40, width), generator=gen).float()
        logits[:20] = torch.where(logits[:20] == 0, -0.0, logits[:20])  # both zeros tie as maxima
        logits[20:30] = -torch.rand(10, width, generator=gen)  # the maximum is a unique negative
        nan_rows = torch.randint(0, width, (10,), generator=gen)
        logits[torch.arange(30, 40), nan_rows] = float("nan")
        logits[35:40, (nan_rows[5:] + 1).clamp(max=width - 1)] = float("nan")  # a second NaN after it
        logits = logits.to(dtype)
        assert torch.equal(argmax_rows(logits), logits.float().argmax(dim=-1)), width
