"""Strict, typed reading of a judge's output: a rating from 1 to 10, or a verdict A, B or tie.

Anything else is a ParseFailure that keeps the raw text; it is never turned into a score. The
rule is the prompt's: the answer must contain exactly one marker of the asked form (`Rating:
[[N]]`, or one of `[[A]]`, `[[B]]`, `[[C]]`), possibly repeated with the same value. Two different
values (a judge quoting the format, or hedging) are a failure, not the last one wins.
"""

from __future__ import annotations

import re
from typing import Literal

Verdict = Literal["A", "B", "tie"]

_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")


class ParseFailure(ValueError):
    def __init__(self, reason: str, raw: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.raw = raw


def rating(text: str) -> float:
    values = {float(v) for v in _RATING.findall(text)}
    if not values:
        raise ParseFailure("no rating in the form [[N]]", text)
    if len(values) > 1:
        raise ParseFailure(f"several different ratings: {sorted(values)}", text)
    (value,) = values
    if not 1 <= value <= 10:
        raise ParseFailure(f"rating {value:g} is outside 1–10", text)
    return value


def verdict(text: str) -> Verdict:
    found = set(_VERDICT.findall(text))
    if not found:
        raise ParseFailure("no verdict in the form [[A]], [[B]] or [[C]]", text)
    if len(found) > 1:
        raise ParseFailure(f"several different verdicts: {sorted(found)}", text)
    (value,) = found
    return "tie" if value == "C" else value  # type: ignore[return-value]


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
