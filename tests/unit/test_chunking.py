"""chunk_text: sentence-aware word windows with overlap."""

from __future__ import annotations

import pytest

from agentfabric.errors import ConfigError
from tools.vectors import chunk_text


def test_short_text_is_one_chunk_and_blank_text_none() -> None:
    text = "Acme sells anvils.  They ship fast."
    assert chunk_text(text) == ["Acme sells anvils. They ship fast."]
    assert chunk_text("") == []
    assert chunk_text(" \n\n \t ") == []


def test_sentences_are_packed_whole_with_overlap() -> None:
    text = "One two three four. Five six seven eight.\n\nNine ten eleven twelve. Thirteen fourteen."
    chunks = chunk_text(text, max_words=8, overlap=2)
    assert chunk_text(text, max_words=7, overlap=2) == [
        "One two three four.",
        "three four. Five six seven eight.",
        "seven eight. Nine ten eleven twelve.",
        "eleven twelve. Thirteen fourteen.",
    ]
    assert chunks == [
        "One two three four. Five six seven eight.",
        "seven eight. Nine ten eleven twelve. Thirteen fourteen.",
    ]
    assert all(len(c.split()) <= 8 for c in chunks)


def test_long_sentence_is_windowed_and_every_word_kept() -> None:
    words = [f"w{i}" for i in range(25)]
    chunks = chunk_text(" ".join(words), max_words=10, overlap=3)
    assert [len(c.split()) for c in chunks] == [10, 10, 10, 4]
    assert chunks[1].split()[:3] == chunks[0].split()[-3:]
    seen = [w for c in chunks for w in c.split()]
    assert set(seen) == set(words)
    assert all(len(set(c.split())) == len(c.split()) for c in chunks)  # no word repeated
    assert all(c.strip() for c in chunks)
    assert chunk_text(" ".join(words), max_words=10, overlap=3) == chunks  # deterministic


def test_no_overlap() -> None:
    assert chunk_text("a b c. d e f.", max_words=3, overlap=0) == ["a b c.", "d e f."]


@pytest.mark.parametrize(("max_words", "overlap"), [(0, 0), (5, 5), (5, -1)])
def test_bad_settings(max_words: int, overlap: int) -> None:
    with pytest.raises(ConfigError):
        chunk_text("text", max_words=max_words, overlap=overlap)
