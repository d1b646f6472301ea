"""Checks on a proposed prompt before anyone spends a call on it: does it copy text it should not?

A weak optimizer model pastes what it was shown: its own instructions, one training example's
question or answer, the backward engine's diagnosis of one failure. Such a prompt may even win
on validation by chance, but it does not generalise (a prompt about "the age of Ferdi Taygan").
Words are compared case- and punctuation-blind, as runs of n consecutive words.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

COPY_WORDS = 6  # a run this long taken from one example or diagnosis is a paste, not a rule


def words(text: str) -> list[str]:
    return re.findall(r"[^\W_]+", text.lower())


def sentences(text: str) -> list[list[str]]:
    """The words of each sentence (or clause after a colon/semicolon): a copied run never spans two, so a
    prompt that quotes a sentence the current prompt already has is not a copy of what follows it."""
    return [w for w in (words(part) for part in re.split(r"[.!?;:\n]+", text)) if w]


def ngrams(seq: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)}


def text_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """The n-word runs of `text`, sentence by sentence."""
    return set().union(*(ngrams(s, n) for s in sentences(text))) if text else set()


def shared_run(value: str, grams: set[tuple[str, ...]] | frozenset, n: int,
               allowed: set[tuple[str, ...]] | frozenset = frozenset()) -> str | None:
    """The first run of n words of `value` that is in `grams` and not in `allowed`, or None."""
    seq = words(value)
    for i in range(len(seq) - n + 1):
        run = tuple(seq[i:i + n])
        if run in grams and run not in allowed:
            return " ".join(run)
    return None


def copied_run(value: str, grams: set[tuple[str, ...]] | frozenset, n: int,
               allowed: set[tuple[str, ...]] | frozenset = frozenset()) -> str | None:
    """The first longest run of words of `value`, within one sentence, whose every n-word window is in
    `grams` and not in `allowed` (what the refusal quotes back to the optimizer), or None."""
    for seq in sentences(value):
        hits = [tuple(seq[i:i + n]) in grams and tuple(seq[i:i + n]) not in allowed for i in range(len(seq) - n + 1)]
        if True in hits:
            start = end = hits.index(True)
            while end + 1 < len(hits) and hits[end + 1]:
                end += 1
            return " ".join(seq[start:end + n])
    return None


def copied_span(value: str, sources: Mapping[str, str], *, n: int = COPY_WORDS,
                ignore: Iterable[str] = ()) -> tuple[str, str] | None:
    """(source name, run of words) of the first n-word run `value` shares with one of `sources`, or
    None. Runs that also occur in `ignore` (the current values of the params) are not copies: a
    proposal may keep what the prompt already says."""
    allowed: set[tuple[str, ...]] = set()
    for text in ignore:
        allowed |= text_ngrams(text, n)
    for name, text in sources.items():
        run = copied_run(value, text_ngrams(text, n), n, allowed)
        if run is not None:
            return name, run
    return None


_DIAGNOSIS = re.compile(r"(?:\(Diagnosis: (.*)\)\s*$|^Diagnosis: (.*)$)", re.DOTALL)


def diagnosis_of(feedback: str) -> str | None:
    """The backward engine's diagnosis inside a gradient's text (grad/backward.py writes it as
    `<feedback> (Diagnosis: ...)` or `Diagnosis: ...`)."""
    m = _DIAGNOSIS.search(feedback.strip())
    return (m.group(1) or m.group(2)).strip() if m else None
