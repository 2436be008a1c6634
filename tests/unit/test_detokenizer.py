"""IncrementalDetokenizer against the oracle `tokenizer.decode` on the whole output.

The main tokenizer is the embedded SmolLM2 one (byte-level BPE, loaded once per process through
get_tokenizer's cache); a tiny Llama-style (SentencePiece, byte fallback) tokenizer is built here
from `tokenizers` to check leading spaces across the prompt boundary.
"""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest

from kiln.engine.detokenizer import IncrementalDetokenizer, decode_token

TEXTS = [
    "Hello, world! This is plain ASCII text.",
    "Emoji: 🙂👍🏽 and a family 👨‍👩‍👧 end",
    "中文：你好，世界。日本語のテキスト",
    "Accents: héllo wörld café naïve Ångström",
    "multiple    spaces   and\ttabs",
    "line one\n\nline two\n   indented\n",
    "<|im_start|>assistant\nHi there<|im_end|>\nmore text after",
]


@pytest.fixture(scope="module")
def tok():
    from kiln.config import default_model_path
    from kiln.tokenizer import get_tokenizer

    return get_tokenizer(default_model_path())


@pytest.fixture(scope="module")
def prompt_ids(tok) -> list[int]:
    return tok.encode("<|im_start|>user\nSay something<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def sp_tok():
    """A tiny Llama-2-style tokenizer: Metaspace pieces, byte fallback, space-stripping decoder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["Hello world, this is a tiny corpus.", "The quick brown fox jumps over the lazy dog.",
              "say hello there, general kenobi"] * 4
    backend = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    backend.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=150, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    spec = json.loads(backend.to_str())
    for byte in range(256):  # byte-fallback pieces, as in Llama's vocabulary
        spec["model"]["vocab"].setdefault(f"<0x{byte:02X}>", len(spec["model"]["vocab"]))
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                   bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _params(**overrides) -> SimpleNamespace:
    fields = dict(stop=None, include_stop_str_in_output=False, skip_special_tokens=True,
                  spaces_between_special_tokens=True, detokenize=True)
    fields.update(overrides)
    return SimpleNamespace(**fields)


def _stream(tok, prompt_ids, ids, params, chunk=1, stop_terminated=False):
    """Feed ids `chunk` at a time, reading deltas as a streaming server would.

    Checks on the way that text handed out is never taken back: every prefix of the deltas is a
    prefix of the final text. Returns (detokenizer, deltas, matched stop string).
    """
    detok = IncrementalDetokenizer(tok, prompt_ids, params)
    deltas: list[str] = []
    stop = None
    for start in range(0, len(ids), chunk):
        last = start + chunk >= len(ids)
        stop = detok.update(ids[start:start + chunk], stop_terminated and last)
        deltas.append(detok.get_next_output_text(finished=last or stop is not None, delta=True))
        if stop is not None:
            break
    final = detok.output_text
    assert "".join(deltas) == final
    for i in range(len(deltas)):
        assert final.startswith("".join(deltas[:i]))
    return detok, deltas, stop


@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_deltas_equal_full_decode(tok, prompt_ids, text, skip_special_tokens, chunk):
    """Concatenated deltas equal tokenizer.decode of all output ids, and no delta shows a partial character."""
    ids = tok.encode(text)
    detok, deltas, stop = _stream(tok, prompt_ids, ids, _params(skip_special_tokens=skip_special_tokens),
                                  chunk=chunk)
    assert stop is None
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip_special_tokens)
    assert not any("\ufffd" in d for d in deltas)


def test_multibyte_character_waits_for_all_its_tokens(tok, prompt_ids):
    """A character split over byte-level tokens is emitted whole, once its last token arrives."""
    ids = tok.encode("a你")
    assert len(ids) == 3  # "a", then the character's bytes over two tokens
    detok, deltas, _ = _stream(tok, prompt_ids, ids, _params())
    assert deltas == ["a", "", "你"]


def test_random_ids_match_decode(tok):
    """Any id sequence (invalid UTF-8 included) decodes as tokenizer.decode does."""
    rng = random.Random(0)
    ids = [rng.randrange(len(tok)) for _ in range(1500)] + tok.encode(" end.")
    for skip in (True, False):
        detok, _, _ = _stream(tok, [], ids, _params(skip_special_tokens=skip))
        assert detok.output_text == tok.decode(ids, skip_special_tokens=skip)


def test_decode_window_stays_small(tok, prompt_ids):
    """Per-token work is bounded: the decode window does not grow with the output."""
    ids = tok.encode(" ".join(TEXTS) * 20)
    detok = IncrementalDetokenizer(tok, prompt_ids, _params())
    widest = 0
    for token_id in ids:
        detok.update([token_id], False)
        widest = max(widest, len(detok._ids))
    assert widest <= 8
    assert detok.output_text == tok.decode(ids, skip_special_tokens=True)


def test_prompt_ending_mid_character_does_not_leak_prompt_text(tok):
    """A prompt cut inside a character is not decoded into the output."""
    ids = tok.encode("Prompt text 你好 world")
    tokens = tok.convert_ids_to_tokens(ids)
    cut = next(i for i in range(1, len(ids)) if tok.decode(ids[:i]).endswith("\ufffd"))
    detok, _, _ = _stream(tok, ids[:cut], ids[cut:], _params())
    assert detok.output_text == tok.decode(ids[cut:])
    assert "Prompt" not in detok.output_text, tokens


def test_sentencepiece_leading_space_decoded_in_context(sp_tok):
    """The first output token's '▁' becomes a space after the prompt, which a standalone decode strips."""
    ids = sp_tok.encode("say hello world 你好 🙂 ok")
    assert sp_tok.convert_ids_to_tokens(ids[1]).startswith("▁")
    prompt, output = ids[:1], ids[1:]
    expected = sp_tok.decode(ids)[len(sp_tok.decode(prompt)):]
    assert expected.startswith(" hello") and not sp_tok.decode(output).startswith(" ")
    for chunk in (1, 2):
        detok, deltas, _ = _stream(sp_tok, prompt, output, _params(), chunk=chunk)
        assert detok.output_text == expected
        assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_sentencepiece_special_tokens(sp_tok, skip_special_tokens):
    """Special tokens in the output follow skip_special_tokens, as decode of prompt + output does."""
    prompt = [sp_tok.bos_token_id] + sp_tok.encode("say")
    output = sp_tok.encode("hello world") + [sp_tok.eos_token_id] + sp_tok.encode("the fox")
    detok, _, _ = _stream(sp_tok, prompt, output, _params(skip_special_tokens=skip_special_tokens))
    full = sp_tok.decode(prompt + output, skip_special_tokens=skip_special_tokens)
    prompt_text = sp_tok.decode(prompt, skip_special_tokens=skip_special_tokens)
    assert detok.output_text == full[len(prompt_text):]
    assert ("</s>" in detok.output_text) is not skip_special_tokens


# --- stop strings -------------------------------------------------------------------------------

TEXT = "Hello world. Bye now, see you."


@pytest.mark.parametrize("chunk", [1, 4])
@pytest.mark.parametrize(
    "stop, include, expected_text, expected_stop",
    [
        (["world"], False, "Hello ", "world"),  # one whole token
        (["world"], True, "Hello world", "world"),
        (["lo wo"], False, "Hel", "lo wo"),  # straddles two tokens
        (["lo wo"], True, "Hello wo", "lo wo"),
        (["now", "Bye", "zzz"], False, "Hello world. ", "Bye"),  # the earliest match wins, not list order
        (["world", "lo"], False, "Hel", "lo"),  # the match that completes first wins
        (["you.", "see"], True, "Hello world. Bye now, see", "see"),
        (["Hello world. B"], False, "", "Hello world. B"),  # spans many tokens from the start
        (["o world. Bye now, s"], True, "Hello world. Bye now, s", "o world. Bye now, s"),
    ],
)
def test_stop_strings(tok, prompt_ids, chunk, stop, include, expected_text, expected_stop):
    """A stop string cuts the text before it (or after it with include_stop_str_in_output), across tokens."""
    params = _params(stop=stop, include_stop_str_in_output=include)
    detok, deltas, matched = _stream(tok, prompt_ids, tok.encode(TEXT), params, chunk=chunk)
    assert matched == expected_stop
    assert detok.output_text == expected_text
    assert detok.stop_reason == expected_stop


def test_partial_stop_string_is_withheld_then_released(tok, prompt_ids):
    """Text that starts a stop string is held back while unfinished and released when the match fails."""
    stop = "world peace"
    params = _params(stop=[stop])
    ids = tok.encode(TEXT)
    detok = IncrementalDetokenizer(tok, prompt_ids, params)
    returned = ""
    for i, token_id in enumerate(ids):
        assert detok.update([token_id], False) is None
        finished = i == len(ids) - 1
        returned += detok.get_next_output_text(finished, delta=True)
        if not finished:
            assert len(returned) <= max(len(detok.output_text) - (len(stop) - 1), 0)
            assert detok.get_next_output_text(False, delta=False) == returned
    assert returned == TEXT == detok.output_text


def test_withheld_text_never_shows_partial_stop_that_completes(tok, prompt_ids):
    """No delta ever contains the start of a stop string that later completes."""
    stop = "42. D"
    detok, deltas, matched = _stream(tok, prompt_ids, tok.encode("The answer is 42. Done."),
                                     _params(stop=[stop]))
    assert matched == stop
    assert "".join(deltas) == "The answer is "
    assert not any("4" in d for d in deltas)


def test_update_after_stop_is_ignored(tok, prompt_ids):
    """Once a stop string matched, later tokens change nothing."""
    detok = IncrementalDetokenizer(tok, prompt_ids, _params(stop=["world"]))
    assert detok.update(tok.encode("Hello world"), False) == "world"
    assert detok.update(tok.encode(" more"), False) is None
    assert detok.output_text == "Hello "


@pytest.mark.parametrize("include, expected", [(False, "Hello world"), (True, "Hello world<|im_end|>")])
def test_stop_terminated_special_token(tok, prompt_ids, include, expected):
    """The stop token's text (EOS here) is left out unless include_stop_str_in_output."""
    ids = tok.encode("Hello world") + [tok.eos_token_id]
    params = _params(skip_special_tokens=False, include_stop_str_in_output=include)
    for chunk in (1, len(ids)):
        detok, _, matched = _stream(tok, prompt_ids, ids, params, chunk=chunk, stop_terminated=True)
        assert matched is None and detok.output_text == expected


@pytest.mark.parametrize("include, expected", [(False, "Hello world"), (True, "Hello world.")])
def test_stop_terminated_plain_token(tok, prompt_ids, include, expected):
    """A non-special stop token (a stop_token_ids hit) is left out too unless include_stop_str_in_output."""
    ids = tok.encode("Hello world.")
    assert tok.decode(ids[-1:]) == "."
    detok, _, _ = _stream(tok, prompt_ids, ids, _params(include_stop_str_in_output=include), stop_terminated=True)
    assert detok.output_text == expected


def test_stop_string_in_same_step_as_stop_token(tok, prompt_ids):
    """A stop string completed before the stop token in the same step is still reported."""
    ids = tok.encode("Hello world") + [tok.eos_token_id]
    detok = IncrementalDetokenizer(tok, prompt_ids, _params(stop=["lo w"]))
    assert detok.update(ids, True) == "lo w"
    assert detok.output_text == "Hel"


def test_non_delta_output_withholds_stop_prefix(tok, prompt_ids):
    """delta=False returns all text but the withheld tail while unfinished, everything once finished."""
    detok = IncrementalDetokenizer(tok, prompt_ids, _params(stop=["xyz!"]))
    detok.update(tok.encode("Hello world"), False)
    assert detok.get_next_output_text(False, delta=False) == "Hello wo"
    assert detok.get_next_output_text(True, delta=False) == "Hello world"
    assert detok.get_next_output_text(False, delta=True) == "Hello wo"
    assert detok.get_next_output_text(True, delta=True) == "rld"


# --- decode_token -------------------------------------------------------------------------------

def test_decode_token(tok):
    """One token's text as logprobs show it: byte-level spaces decoded, specials kept, partial bytes U+FFFD."""
    world = tok.encode(" world")
    assert len(world) == 1 and decode_token(tok, world[0]) == " world"
    assert decode_token(tok, tok.eos_token_id) == "<|im_end|>"
    first_byte_of_char = tok.encode("a你")[1]
    assert "\ufffd" in decode_token(tok, first_byte_of_char)
    hits = decode_token.cache_info().hits
    decode_token(tok, world[0])
    assert decode_token.cache_info().hits == hits + 1


class _SlowTokenizer:
    """Stands in for a Python (slow) tokenizer: only decode and all_special_ids, no Rust backend."""

    def __init__(self, fast) -> None:
        self._fast = fast
        self.all_special_ids = fast.all_special_ids

    def decode(self, ids, skip_special_tokens=False, **kwargs) -> str:
        return self._fast.decode(ids, skip_special_tokens=skip_special_tokens, **kwargs)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_tokenizer_without_rust_backend(tok, prompt_ids, skip_special_tokens):
    """Tokenizers without a Rust backend decode through tokenizer.decode with the same result."""
    slow = _SlowTokenizer(tok)
    ids = tok.encode(TEXTS[1] + TEXTS[6])
    detok, deltas, _ = _stream(slow, prompt_ids, ids, _params(skip_special_tokens=skip_special_tokens))
    assert detok.output_text == tok.decode(ids, skip_special_tokens=skip_special_tokens)
    assert not any("\ufffd" in d for d in deltas)


def test_with_sampling_params(tok, prompt_ids):
    """kiln's SamplingParams drives the detokenizer (a bare stop string included)."""
    from kiln.sampling.params import SamplingParams

    detok, _, matched = _stream(tok, prompt_ids, tok.encode(TEXT), SamplingParams(stop="Bye"))
    assert matched == "Bye" and detok.output_text == "Hello world. "


def test_samples_with_different_options_decode_side_by_side(tok, prompt_ids):
    """Samples share the cache of single-id texts only with samples of the same options: fed
    token by token in turn, each still equals the full decode under its own options."""
    ids = tok.encode(TEXTS[-1] + TEXTS[1], add_special_tokens=False)
    detoks = {skip: IncrementalDetokenizer(tok, prompt_ids, SimpleNamespace(skip_special_tokens=skip))
              for skip in (True, False)}
    for token_id in ids:
        for detok in detoks.values():
            detok.update([token_id], stop_terminated=False)
    for skip, detok in detoks.items():
        assert detok.output_text == tok.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
