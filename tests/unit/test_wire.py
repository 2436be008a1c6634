"""Messages to the engine core process: the tokenizer and compiled grammars travel by reference,
everything else by value."""

from __future__ import annotations

import pytest

from kiln.core.request import EngineCoreRequest
from kiln.engine.wire import RequestDecoder, RequestEncoder, dumps, loads
from kiln.sampling.params import SamplingParams
from kiln.structured.params import StructuredOutputsParams


VOCAB_SIZE = 49152  # SmolLM2's


@pytest.fixture(scope="module")
def tokenizer():
    from kiln.config import default_model_path
    from kiln.tokenizer import get_tokenizer

    return get_tokenizer(default_model_path())


class _Holder:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer


def test_the_tokenizer_travels_by_reference(tokenizer):
    core_side_tokenizer = object()
    loads_of_tokenizer = []

    def load():
        loads_of_tokenizer.append(1)
        return core_side_tokenizer

    encoder, decoder = RequestEncoder(tokenizer), RequestDecoder(VOCAB_SIZE, load)
    params = SamplingParams(max_tokens=3, stop=["x"])
    params.reasoning_gate = _Holder(tokenizer)
    request = EngineCoreRequest("r1", [1, 2, 3], params, eos_token_id=2, max_tokens=3, arrival_time=1.5)
    data = encoder.dumps(request)
    assert len(data) < 5000  # the 1.5 MB tokenizer is not in it
    got = decoder.loads(data)
    assert got.sampling_params.reasoning_gate.tokenizer is core_side_tokenizer
    assert (got.request_id, got.prompt_token_ids, got.max_tokens, got.sampling_params.stop) == ("r1", [1, 2, 3], 3,
                                                                                                  ["x"])
    decoder.loads(encoder.dumps(request))
    assert len(loads_of_tokenizer) == 1  # loaded once, on first need
    assert decoder.loads(encoder.dumps([1, "a"])) == [1, "a"]
    assert len(loads_of_tokenizer) == 1


def test_a_compiled_grammar_is_rebuilt_on_the_core_side(tokenizer):
    import xgrammar as xgr

    from kiln.structured.backend import XgrammarBackend

    backend = XgrammarBackend(tokenizer, VOCAB_SIZE)
    grammar = backend.compile(StructuredOutputsParams(choice=["alpha", "beta"]))
    params = SamplingParams(max_tokens=3)
    params.compiled_grammar = grammar
    encoder, decoder = RequestEncoder(tokenizer), RequestDecoder(VOCAB_SIZE, lambda: tokenizer)
    got = decoder.loads(encoder.dumps(params)).compiled_grammar
    assert isinstance(got, xgr.CompiledGrammar) and got is not grammar
    assert got.serialize_json() == grammar.serialize_json()
    # the same bitmask as the original allows, before and after a token
    masks = []
    for compiled in (grammar, got):
        matcher = xgr.GrammarMatcher(compiled)
        bitmask = xgr.allocate_token_bitmask(1, VOCAB_SIZE)
        matcher.fill_next_token_bitmask(bitmask)
        first = tokenizer.encode("alpha", add_special_tokens=False)[0]
        assert matcher.accept_token(first)
        after = xgr.allocate_token_bitmask(1, VOCAB_SIZE)
        matcher.fill_next_token_bitmask(after)
        masks.append((bitmask.clone(), after.clone()))
    assert all((a == b).all() for a, b in zip(*masks))


def test_plain_messages_round_trip():
    from kiln.core.outputs import EngineCoreOutput, LogprobsLists

    output = EngineCoreOutput("r", [5, 6], LogprobsLists([[5, 1]], [[-0.1, -2.0]], [1]), finish_reason="length")
    assert loads(dumps(("outputs", [output]))) == ("outputs", [output])
