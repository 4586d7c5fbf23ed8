"""Typed reading of a judge's output: a rating from 1 to 10, or a verdict A, B or tie, read as
FastChat's MT-bench (`fastchat/llm_judge/common.py`, 0.2.36) reads it, so the same judge output
gives the same number in both: the first `[[N]]`, or failing that the first `[N]`; for a pair,
`[[A]]` if present, else `[[B]]`, else `[[C]]`.

Anything else is a ParseFailure that keeps the raw text; it is never turned into a score (where
FastChat records -1 and a pair's "error"). A rating outside 1–10 is one too.
"""

from __future__ import annotations

import re
from typing import Literal

Verdict = Literal["A", "B", "tie"]

_RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_RATING_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")


class ParseFailure(ValueError):
    def __init__(self, reason: str, raw: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.raw = raw


def rating(text: str) -> float:
    found = _RATING.search(text) or _RATING_BACKUP.search(text)
    if found is None:
        raise ParseFailure("no rating in the form [[N]] or [N]", text)
    value = float(found.group(1))
    if not 1 <= value <= 10:
        raise ParseFailure(f"rating {value:g} is outside 1–10", text)
    return value


def verdict(text: str) -> Verdict:
    for marker, value in (("[[A]]", "A"), ("[[B]]", "B"), ("[[C]]", "tie")):
        if marker in text:
            return value  # type: ignore[return-value]
    raise ParseFailure("no verdict in the form [[A]], [[B]] or [[C]]", text)


def _fields(text: str) -> dict:
    import json

    try:
        found = json.loads(text)
    except ValueError:
        raise ParseFailure("not JSON (cut off by max_tokens?)", text) from None
    if not isinstance(found, dict):
        raise ParseFailure("not a JSON object", text)
    return found


def rating_json(text: str) -> float:
    """A structured judgment's rating: {"reason": ..., "rating": N}."""
    value = _fields(text).get("rating")
    if not isinstance(value, int) or isinstance(value, bool):
        raise ParseFailure('no whole-number "rating"', text)
    if not 1 <= value <= 10:
        raise ParseFailure(f"rating {value} is outside 1–10", text)
    return float(value)


def verdict_json(text: str) -> Verdict:
    """A structured judgment's verdict: {"reason": ..., "verdict": "A" | "B" | "C"}."""
    value = _fields(text).get("verdict")
    if value not in ("A", "B", "C"):
        raise ParseFailure('no "verdict" of A, B or C', text)
    return "tie" if value == "C" else value


def combine(first: Verdict, swapped: Verdict) -> Verdict:
    """The outcome of a pair judged in both orders, in the first order's terms: `swapped` was
    judged with the answers exchanged. Agreeing verdicts stand; any disagreement is a tie."""
    back = {"A": "B", "B": "A", "tie": "tie"}[swapped]
    return first if first == back else "tie"
