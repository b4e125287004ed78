"""Chunking: split a long text into overlapping word windows for embedding.

The text is split into paragraphs (blank lines), paragraphs into sentences (after ``.``, ``!``
or ``?`` followed by white space), and sentences into words. Whole sentences are packed into a
chunk while it stays within ``max_words``; a sentence longer than that is cut into windows of
``max_words`` words. Each chunk after the first starts with the last ``overlap`` words of the one
before, so a fact spanning a boundary is seen whole at least once. The result depends only on the
arguments, and no chunk is empty.
"""

from __future__ import annotations

import re

from agentfabric.errors import ConfigError

__all__ = ["chunk_text"]

_PARAGRAPH = re.compile(r"\n\s*\n")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _units(text: str, max_words: int, overlap: int) -> list[tuple[list[str], bool]]:
    """Sentences as word lists, long sentences cut into windows of at most ``max_words``.

    The flag marks a window that already starts with the previous window's last words.
    """
    units: list[tuple[list[str], bool]] = []
    for paragraph in _PARAGRAPH.split(text):
        for sentence in _SENTENCE_END.split(paragraph):
            words = sentence.split()
            if len(words) <= max_words:
                if words:
                    units.append((words, False))
                continue
            step = max_words - overlap
            start = 0
            while True:
                units.append((words[start:start + max_words], start > 0))
                if start + max_words >= len(words):
                    break
                start += step
    return units


def chunk_text(text: str, *, max_words: int = 120, overlap: int = 20) -> list[str]:
    """``text`` as chunks of at most ``max_words`` words, consecutive chunks sharing ``overlap``."""
    if max_words < 1:
        raise ConfigError(f"max_words must be at least 1, not {max_words}")
    if not 0 <= overlap < max_words:
        raise ConfigError(f"overlap must be from 0 to max_words - 1 ({max_words - 1}), "
                          f"not {overlap}")
    chunks: list[list[str]] = []
    current: list[str] = []
    for unit, continues in _units(text, max_words, overlap):
        if current and len(current) + len(unit) > max_words:
            chunks.append(current)
            tail = current[-overlap:] if overlap and not continues else []
            current = tail if len(tail) + len(unit) <= max_words else []
        current = current + unit
    if current:
        chunks.append(current)
    return [" ".join(words) for words in chunks]
