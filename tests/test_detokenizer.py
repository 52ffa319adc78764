import random
from collections.abc import Sequence
from typing import Any

import pytest
from omni.stages.llm.detokenizer import IncrementalDetokenizer, find_stop_string
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "hello world, héllo 世界 🙂",
    "the quick brown fox jumps over the lazy dog",
    "stop here STOP now",
    "the dog says héllo to the world",
]
WORDS = ["the", "dog", "héllo", "世界", "🙂", "world", "stop", "here", "naïve", "lazy", ",", "!"]


class _WithoutBackend:
    """The tokenizer as one without a `tokenizers` backend sees it: the detokenizer then
    takes its window path instead of the Rust DecodeStream, and must give the same text."""

    backend_tokenizer = None

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        self._tokenizer = tokenizer

    def __getattr__(self, name: str) -> object:
        return getattr(self._tokenizer, name)

    def __len__(self) -> int:
        return len(self._tokenizer)


def _both_paths(request: pytest.FixtureRequest, tok: PreTrainedTokenizerFast) -> Any:
    return tok if request.param == "stream" else _WithoutBackend(tok)


@pytest.fixture(scope="module", params=["stream", "window"])
def byte_tok(request: pytest.FixtureRequest) -> PreTrainedTokenizerFast:
    """Byte-level BPE like GPT-2/Qwen2; the small vocabulary splits every multi-byte
    character into one token per byte."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=290, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", clean_up_tokenization_spaces=False
    )
    return _both_paths(request, fast)


@pytest.fixture(scope="module", params=["stream", "window"])
def metaspace_tok(request: pytest.FixtureRequest) -> PreTrainedTokenizerFast:
    """SentencePiece-style: the decoder drops the leading space of the first token."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "</s>"],
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=False)
    return _both_paths(request, fast)


def _stream(detok: IncrementalDetokenizer, token_ids: Sequence[int]) -> list[str]:
    return [detok.append(t) for t in token_ids]


def _decode(tok: PreTrainedTokenizerFast, ids: list[int], skip: bool = False) -> str:
    text = tok.decode(ids, skip_special_tokens=skip)
    assert isinstance(text, str)
    return text


def _encode(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    ids = tok.encode(text)
    assert isinstance(ids, list)
    return ids


def test_multibyte_characters_split_over_tokens(byte_tok: PreTrainedTokenizerFast) -> None:
    prompt = _encode(byte_tok, "hello world,")
    output = _encode(byte_tok, " héllo 世界 🙂 the lazy dog")
    # Precondition: the fixture really splits 世, 界 and 🙂 into one token per byte.
    assert byte_tok.convert_ids_to_tokens(output) == [
        "ĠhÃ©llo", "Ġ", "ä", "¸", "ĸ", "ç", "ķ", "Į", "Ġ", "ð", "Ł", "Ļ", "Ĥ",
        "Ġthe", "Ġ", "laz", "y", "Ġdog",
    ]
    detok = IncrementalDetokenizer(byte_tok, prompt, skip_special_tokens=True, stop=[],
                                   include_stop_str_in_output=False)
    deltas = _stream(detok, output)
    assert deltas == [
        " héllo", " ", "", "", "世", "", "", "界", " ", "", "", "", "🙂",
        " the", " ", "laz", "y", " dog",
    ]
    assert detok.output_text == " héllo 世界 🙂 the lazy dog"
    assert "".join(deltas) == byte_tok.decode(output, skip_special_tokens=True)
    assert detok.flush() == ""
    assert detok.stopped_by is None and detok.output_token_ids == output


def test_prompt_ending_in_broken_characters_stays_out_of_the_output(
    byte_tok: PreTrainedTokenizerFast,
) -> None:
    # A prompt of raw token ids may end with lone bytes of multi-byte characters: here the
    # first byte of 世, then the first two bytes of 界.
    lone_bytes = byte_tok.convert_tokens_to_ids(["ä", "ç", "ķ"])
    prompt = _encode(byte_tok, "hello world,") + lone_bytes
    assert "\ufffd" in byte_tok.decode(prompt)
    output = _encode(byte_tok, " the lazy dog")
    detok = IncrementalDetokenizer(byte_tok, prompt)
    assert _stream(detok, output) == [" the", " ", "laz", "y", " dog"]
    assert detok.output_text == " the lazy dog"


def test_first_token_is_decoded_in_prompt_context(
    metaspace_tok: PreTrainedTokenizerFast,
) -> None:
    output = _encode(metaspace_tok, "the dog")
    assert metaspace_tok.convert_ids_to_tokens(output) == ["▁the", "▁dog"]
    # After a prompt the first word keeps its space (it continues the prompt's text) ...
    after_prompt = IncrementalDetokenizer(metaspace_tok, _encode(metaspace_tok, "hello world"))
    assert _stream(after_prompt, output) == [" the", " dog"]
    # ... while decoding the output alone drops it, as the decoder does at the start of text.
    assert metaspace_tok.decode(output) == "the dog"
    no_prompt = IncrementalDetokenizer(metaspace_tok, [])
    assert _stream(no_prompt, output) == ["the", " dog"]


def test_special_tokens_skipped_or_kept(byte_tok: PreTrainedTokenizerFast) -> None:
    eos = byte_tok.eos_token_id
    assert isinstance(eos, int)
    output = [*_encode(byte_tok, " the dog"), eos, *_encode(byte_tok, " here")]
    skipping = IncrementalDetokenizer(byte_tok, _encode(byte_tok, "hi"), skip_special_tokens=True)
    assert _stream(skipping, output) == [" the", " dog", "", " ", "he", "r", "e"]
    assert skipping.output_text == byte_tok.decode(output, skip_special_tokens=True)
    keeping = IncrementalDetokenizer(byte_tok, _encode(byte_tok, "hi"), skip_special_tokens=False)
    assert _stream(keeping, output) == [" the", " dog", "<|endoftext|>", " ", "he", "r", "e"]
    assert keeping.output_text == byte_tok.decode(output, skip_special_tokens=False)
    assert keeping.output_text == " the dog<|endoftext|> here"


def test_out_of_vocabulary_id_decodes_to_nothing(byte_tok: PreTrainedTokenizerFast) -> None:
    detok = IncrementalDetokenizer(byte_tok, _encode(byte_tok, "hi"))
    assert _stream(detok, [_encode(byte_tok, " the")[0], 10**6, -3]) == [" the", "", ""]
    assert detok.output_text == " the"
    assert detok.output_token_ids == [269, 10**6, -3]


STOP_TEXT = " the dog, the dog stop here"


def test_stop_string_is_held_back_then_cut(byte_tok: PreTrainedTokenizerFast) -> None:
    output = _encode(byte_tok, STOP_TEXT)
    assert byte_tok.convert_ids_to_tokens(output) == [
        "Ġthe", "Ġdog", ",", "Ġthe", "Ġdog", "Ġ", "s", "to", "p", "Ġ", "he", "r", "e"]
    detok = IncrementalDetokenizer(byte_tok, _encode(byte_tok, "hi"), stop=["dog stop"])
    deltas = [detok.append(t) for t in output[:9]]
    # "dog" is held back each time it could begin "dog stop"; released when "," shows it
    # does not.
    assert deltas == [" the", " ", "dog,", " the", " ", "", "", "", ""]
    assert detok.stopped_by == "dog stop"
    assert detok.output_text == " the dog, the "
    # The request is over: tokens still in flight are ignored.
    assert detok.append(output[9]) == "" and len(detok.output_token_ids) == 9
    assert detok.flush() == ""


def test_include_stop_str_in_output(byte_tok: PreTrainedTokenizerFast) -> None:
    output = _encode(byte_tok, STOP_TEXT)
    detok = IncrementalDetokenizer(byte_tok, [], stop=["dog stop"],
                                   include_stop_str_in_output=True)
    # Nothing is held back: the stop string would be shown anyway.
    assert _stream(detok, output[:9]) == [" the", " dog", ",", " the", " dog", " ", "s", "to", "p"]
    assert detok.output_text == " the dog, the dog stop"
    # A stop string ending inside a token cuts the rest of that token.
    cut = IncrementalDetokenizer(byte_tok, [], stop=["do"], include_stop_str_in_output=True)
    assert cut.extend(output) == " the do"
    assert cut.stopped_by == "do" and len(cut.output_token_ids) == 2
    excluded = IncrementalDetokenizer(byte_tok, [], stop=["do"])
    assert excluded.extend(output) == " the "
    assert excluded.output_text == " the "


def test_flush_releases_held_tail(byte_tok: PreTrainedTokenizerFast) -> None:
    output = _encode(byte_tok, STOP_TEXT)
    detok = IncrementalDetokenizer(byte_tok, [], stop=["stop h"])
    assert "".join(_stream(detok, output[:8])) == " the dog, the dog "
    assert detok.output_text == " the dog, the dog sto"
    assert detok.flush() == "sto"
    assert detok.flush() == ""
    assert detok.stopped_by is None


def test_earliest_ending_stop_string_wins(byte_tok: PreTrainedTokenizerFast) -> None:
    output = _encode(byte_tok, STOP_TEXT)
    first = IncrementalDetokenizer(byte_tok, [], stop=["the dog stop", "dog,"])
    assert first.extend(output) == " the "
    assert first.stopped_by == "dog,"
    # Same end: the longer string wins, whichever order the client listed them in.
    tie = IncrementalDetokenizer(byte_tok, [], stop=["dog", "e dog"])
    assert tie.extend(output) == " th"
    assert tie.stopped_by == "e dog"
    assert find_stop_string("abcabc", ["bc", "abc"], 0) == ("abc", 0)
    assert find_stop_string("abcabc", ["bc", "abc"], 3) == ("abc", 3)
    assert find_stop_string("abcabc", ["bc"], 6) is None


def test_stop_strings_ignore_text_of_the_first_min_tokens(
    byte_tok: PreTrainedTokenizerFast,
) -> None:
    output = _encode(byte_tok, STOP_TEXT)
    early = IncrementalDetokenizer(byte_tok, [], stop=["the"])
    assert early.extend(output) == " "
    late = IncrementalDetokenizer(byte_tok, [], stop=["the"], min_tokens=1)
    assert late.extend(output) == " the dog, "
    assert late.stopped_by == "the" and len(late.output_token_ids) == 4


def test_bad_stop_string_is_rejected(byte_tok: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match=r"^stop strings must be non-empty strings, got ''$"):
        IncrementalDetokenizer(byte_tok, [], stop=["ok", ""])


def _reference_stop(text: str, stop: list[str]) -> tuple[str, str | None]:
    best: tuple[int, int, str] | None = None
    for s in stop:
        start = text.find(s)
        if start >= 0 and (best is None or (start + len(s), -len(s)) < best[:2]):
            best = (start + len(s), -len(s), s)
    if best is None:
        return text, None
    return text[: best[0] - len(best[2])], best[2]


def test_random_streams_match_decode_and_never_leak_stop_prefixes(
    byte_tok: PreTrainedTokenizerFast,
) -> None:
    rng = random.Random(7)
    eos = byte_tok.eos_token_id
    assert isinstance(eos, int)
    fired = 0
    for _ in range(150):
        text = "".join(
            rng.choice(["", " "]) + rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
        output = _encode(byte_tok, text)
        if rng.random() < 0.3:
            # Between whole characters only: inside one, the bytes would be truly invalid.
            cuts = [i for i in range(len(output) + 1)
                    if not _decode(byte_tok, output[:i]).endswith("\ufffd")]
            output.insert(rng.choice(cuts), eos)
        skip = rng.random() < 0.5
        decoded = _decode(byte_tok, output, skip)
        # Stop strings: some cut from the text itself (they may fire), some from the vocabulary.
        stop: list[str] = []
        for _ in range(rng.randint(0, 3)):
            if rng.random() < 0.5 and len(decoded) > 1:
                start = rng.randrange(len(decoded) - 1)
                stop.append(decoded[start:start + rng.randint(1, 6)])
            else:
                stop.append(rng.choice(WORDS) + rng.choice(["", " ", "!"]))
        expected, expected_stop = _reference_stop(decoded, stop)

        detok = IncrementalDetokenizer(byte_tok, _encode(byte_tok, "the world"),
                                       skip_special_tokens=skip, stop=stop)
        streamed = ""
        for token_id in output:
            delta = detok.append(token_id)
            assert "\ufffd" not in delta
            streamed += delta
            assert expected.startswith(streamed)  # never a character that is taken back
            assert not any(s in streamed for s in stop)
        streamed += detok.flush()
        assert streamed == expected
        assert detok.stopped_by == expected_stop
        fired += expected_stop is not None
        if not stop:
            assert streamed == decoded
    assert 40 < fired < 150  # both branches exercised
