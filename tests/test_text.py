"""Incremental detokenization and stop strings, on SmolLM2's real tokenizer."""

from __future__ import annotations

import random

import pytest

from workers.text import IncrementalDetokenizer, StopStrings

MULTIBYTE = "Grüße aus Köln 🌍🚀 — 東京は雨です. Ünïcödé ✓ done."


def test_detokenizer_deltas_add_up_to_the_full_text_and_never_split_a_character(tokenizer) -> None:
    ids = tokenizer.encode(MULTIBYTE)
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.push([token]) for token in ids]
    deltas.append(detokenizer.flush())
    assert "".join(deltas) == tokenizer.decode(ids)
    assert all("\ufffd" not in delta for delta in deltas)
    # Emoji take several byte-level tokens: some steps must have held text back.
    assert "" in deltas[:-1]


def test_detokenizer_handles_tokens_arriving_in_uneven_chunks(tokenizer) -> None:
    ids = tokenizer.encode(MULTIBYTE * 3)
    rng = random.Random(7)
    detokenizer = IncrementalDetokenizer(tokenizer)
    text, i = "", 0
    while i < len(ids):
        n = rng.randint(1, 4)
        text += detokenizer.push(ids[i : i + n])
        i += n
    assert text + detokenizer.flush() == tokenizer.decode(ids)


def test_detokenizer_skips_special_tokens(tokenizer) -> None:
    ids = [*tokenizer.encode("Hello"), tokenizer.eos_token_id]
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert detokenizer.push(ids) + detokenizer.flush() == "Hello"


def test_stop_string_holds_back_a_possible_prefix_until_it_is_decided() -> None:
    stops = StopStrings(["END"])
    assert stops.feed("abc E") == ("abc ", False)
    assert stops.feed("N") == ("", False)
    assert stops.feed("X more") == ("ENX more", False)


def test_stop_string_split_across_chunks_cuts_before_it() -> None:
    stops = StopStrings(["END"])
    assert stops.feed("abc EN") == ("abc ", False)
    assert stops.feed("D tail") == ("", True)


def test_earliest_of_several_stop_strings_wins() -> None:
    stops = StopStrings(["world", "lo"])
    assert stops.feed("hello world") == ("hel", True)


@pytest.mark.parametrize("seed", range(20))
def test_any_chunking_of_the_text_gives_the_same_cut(seed: int) -> None:
    rng = random.Random(seed)
    text = "".join(rng.choice("abcxyz ") for _ in range(60))
    stop = text[rng.randint(10, 50) :][:3]
    expected = text[: text.find(stop)]
    stops = StopStrings([stop])
    out, hit, i = "", False, 0
    while i < len(text) and not hit:
        n = rng.randint(1, 5)
        piece, hit = stops.feed(text[i : i + n])
        out += piece
        i += n
    assert hit
    assert out == expected


def test_text_without_stop_strings_passes_straight_through() -> None:
    stops = StopStrings([])
    assert stops.feed("anything END") == ("anything END", False)
    assert stops.flush() == ""
