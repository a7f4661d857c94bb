"""Passages: long reports split to the text encoder's token limit (CONCH: 127 tokens), each passage a
Report whose ``parent_id`` names the report it came from (clipit/corpus.py)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from clipit.corpus import Report

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _split_chars(s: str, max_tokens: int, count: Callable[[str], int]) -> list[str]:
    """Last resort for one word longer than the context (OCR runs like '--------...'): binary-search cuts."""
    out = []
    while s:
        lo, hi = 0, len(s)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if count(s[:mid]) <= max_tokens else (lo, mid - 1)
        if lo == 0:
            raise ValueError(f"max_tokens={max_tokens} cannot hold a single character of {s[:20]!r}")
        out.append(s[:lo])
        s = s[lo:]
    return out


def _pack(units: list[str], max_tokens: int, count: Callable[[str], int], level: int) -> list[str]:
    """Greedily join units (level 0: sentences, 1: words) with spaces; a unit that alone is too long is
    split one level down. Every string returned has been checked with count() <= max_tokens."""
    out: list[str] = []
    cur: str | None = None
    for u in units:
        if cur is not None and count(f"{cur} {u}") <= max_tokens:
            cur = f"{cur} {u}"
            continue
        if cur is not None:
            out.append(cur)
        if count(u) <= max_tokens:
            cur = u
            continue
        sub = _pack(u.split(" "), max_tokens, count, 1) if level == 0 else _split_chars(u, max_tokens, count)
        out.extend(sub[:-1])
        cur = sub[-1]
    if cur is not None:
        out.append(cur)
    return out


def _windows(words: list[str], max_tokens: int, count: Callable[[str], int], stride: int) -> list[str]:
    """Overlapping word windows: each starts `stride` words after the previous one (never past its end,
    so no word is skipped) and grows while it fits."""
    out, start = [], 0
    while start < len(words):
        end = start
        while end < len(words) and count(" ".join(words[start : end + 1])) <= max_tokens:
            end += 1
        if end == start:  # one word alone is too long
            out.extend(_split_chars(words[start], max_tokens, count))
            start += 1
            continue
        out.append(" ".join(words[start:end]))
        if end == len(words):
            break
        start = min(start + stride, end)
    return out


def chunk_reports(
    reports: Iterable[Report], max_tokens: int, count_tokens: Callable[[str], int], stride_words: int | None = None
) -> list[Report]:
    """Split reports into passages with count_tokens(passage) <= max_tokens (CONCH: 127).

    Default: pack whole sentences, falling back to words, then characters, for overlong pieces; the
    passages of a report concatenate back to its words in order. With ``stride_words`` passages are
    overlapping word windows instead. Passage ids are ``<id>#p<k>`` (k from 0, also for reports that fit
    in one passage, so every passage maps back through ``parent_id``).
    count_tokens must not truncate (open_clip tokenizers cut at their context length): a truncating counter
    with a limit <= max_tokens would call every report a fit."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if stride_words is not None and stride_words < 1:
        raise ValueError(f"stride_words must be >= 1, got {stride_words}")
    out = []
    for r in reports:
        text = " ".join(r.text.split())
        if count_tokens(text) <= max_tokens:
            pieces = [text]
        elif stride_words is None:
            pieces = _pack(_SENTENCE_END.split(text), max_tokens, count_tokens, 0)
        else:
            pieces = _windows(text.split(" "), max_tokens, count_tokens, stride_words)
        out += [Report(f"{r.id}#p{k}", p, r.organ, r.project, dict(r.meta), r.id) for k, p in enumerate(pieces)]
    return out
