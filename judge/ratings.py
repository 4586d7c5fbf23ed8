"""Arena ratings from battles: online Elo, Bradley–Terry maximum likelihood with bootstrap
confidence intervals, and the win-fraction and battle-count matrices.

A battle is FastChat's shape: {"model_a", "model_b", "winner": "model_a" | "model_b" | "tie" |
"tie (bothbad)", "anony": bool}. Ties count half a win to each side. Ratings are on the Elo
scale: 400 points of difference mean 10:1 odds, and the models' mean rating is 1000.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

SCALE = 400.0
BASE = 10.0
MEAN_RATING = 1000.0
_WINNERS = {"model_a": 1.0, "model_b": 0.0, "tie": 0.5, "tie (bothbad)": 0.5}


@dataclass(frozen=True)
class Battle:
    model_a: str
    model_b: str
    score_a: float  # 1 a won, 0 b won, 0.5 a tie

    @classmethod
    def from_record(cls, record: dict) -> Battle:
        winner = record["winner"]
        if winner not in _WINNERS:
            raise ValueError(f"unknown winner {winner!r}; one of {', '.join(_WINNERS)}")
        return cls(record["model_a"], record["model_b"], _WINNERS[winner])


_LOG_WINNERS = {
    "leftvote": "model_a",
    "rightvote": "model_b",
    "tievote": "tie",
    "bothbad_vote": "tie (bothbad)",
}


def battles_from_log(records: Iterable[dict]) -> list[dict]:
    """Battle records from conversation-log records (FastChat's, or Corral's export), the way
    FastChat's cleaning reads them: only the four battle votes; `models` empty means anonymous,
    and the real names come from the states; a record naming only one side is skipped."""
    battles = []
    for record in records:
        winner = _LOG_WINNERS.get(record.get("type", ""))
        if winner is None:
            continue
        public = record["models"]
        hidden = [state.get("model_name") for state in record["states"]]
        if (public[0] == "") != (public[1] == ""):
            continue
        anony = public[0] == ""
        models = hidden if anony else public
        if None in models:
            continue
        battles.append(
            {
                "model_a": models[0],
                "model_b": models[1],
                "winner": winner,
                "anony": anony,
                "tstamp": record["tstamp"],
                "judge": record.get("ip", ""),
            }
        )
    return battles


def anonymous(records: Iterable[dict]) -> list[Battle]:
    """The battles that count for ratings: anonymous ones, between two different models."""
    return [Battle.from_record(r) for r in records if r.get("anony", False) and r["model_a"] != r["model_b"]]


def online_elo(battles: list[Battle], k: float = 4.0) -> dict[str, float]:
    """Elo updated battle by battle, in order (FastChat's K of 4); mean shifted to 1000."""
    ratings: dict[str, float] = {}
    for b in battles:
        ra, rb = ratings.setdefault(b.model_a, MEAN_RATING), ratings.setdefault(b.model_b, MEAN_RATING)
        expected_a = 1 / (1 + BASE ** ((rb - ra) / SCALE))
        ratings[b.model_a] = ra + k * (b.score_a - expected_a)
        ratings[b.model_b] = rb - k * (b.score_a - expected_a)
    shift = MEAN_RATING - (sum(ratings.values()) / len(ratings) if ratings else MEAN_RATING)
    return {m: r + shift for m, r in ratings.items()}


def _tally(battles: list[Battle], models: list[str], weights: np.ndarray | None = None) -> np.ndarray:
    """wins[i, j]: (weighted) wins of model i over model j, ties counted half to each."""
    index = {m: i for i, m in enumerate(models)}
    a = np.array([index[b.model_a] for b in battles])
    c = np.array([index[b.model_b] for b in battles])
    score = np.array([b.score_a for b in battles])
    w = np.ones(len(battles)) if weights is None else weights
    wins = np.zeros((len(models), len(models)))
    np.add.at(wins, (a, c), w * score)
    np.add.at(wins, (c, a), w * (1 - score))
    return wins


def _fit(wins: np.ndarray, iterations: int = 500, tolerance: float = 1e-9) -> np.ndarray:
    """Bradley–Terry strengths by Hunter's MM algorithm (2004), on the Elo scale, mean 1000.
    A tiny prior (one tie against an average opponent each) keeps a model that never won or
    never lost finite."""
    n = wins.shape[0]
    prior = 0.5
    games = wins + wins.T + 2 * prior / max(n - 1, 1) * (1 - np.eye(n))
    won = wins.sum(axis=1) + prior
    p = np.ones(n)
    for _ in range(iterations):
        denominator = (games / (p[:, None] + p[None, :])).sum(axis=1)
        new = won / denominator
        new /= math.exp(np.log(new).mean())
        if np.abs(new - p).max() < tolerance:
            p = new
            break
        p = new
    log_p = np.log(p)
    return SCALE / math.log(BASE) * (log_p - log_p.mean()) + MEAN_RATING


@dataclass
class Leaderboard:
    models: list[str]
    ratings: np.ndarray  # Bradley–Terry, Elo scale
    lower: np.ndarray  # bootstrap 95% interval
    upper: np.ndarray
    battles: np.ndarray  # battles[i, j]: battles between i and j
    win_fraction: np.ndarray  # wins of i over j / decided battles between them (NaN when none)
    elo: dict[str, float]

    def rows(self) -> list[dict]:
        """Ranked: a model's rank is 1 + the number of models whose lower bound is above its
        upper bound (FastChat's rule: ties where the intervals overlap)."""
        order = np.argsort(-self.ratings)
        rows = []
        for i in order:
            rank = 1 + int((self.lower > self.upper[i]).sum())
            rows.append(
                {
                    "rank": rank,
                    "model": self.models[i],
                    "rating": round(float(self.ratings[i]), 1),
                    "ci_lower": round(float(self.lower[i]), 1),
                    "ci_upper": round(float(self.upper[i]), 1),
                    "battles": int(self.battles[i].sum()),
                    "elo": round(self.elo[self.models[i]], 1),
                }
            )
        return rows


def leaderboard(battles: list[Battle], rounds: int = 200, seed: int = 0) -> Leaderboard:
    """Bradley–Terry ratings with percentile bootstrap intervals over `rounds` resamples of the
    battles, the battle and win-fraction matrices, and online Elo for comparison."""
    models = sorted({b.model_a for b in battles} | {b.model_b for b in battles})
    wins = _tally(battles, models)
    ratings = _fit(wins)
    rng = np.random.default_rng(seed)
    samples = np.empty((rounds, len(models)))
    for r in range(rounds):
        weights = rng.multinomial(len(battles), np.full(len(battles), 1 / len(battles))).astype(float)
        samples[r] = _fit(_tally(battles, models, weights))
    lower, upper = np.percentile(samples, [2.5, 97.5], axis=0)
    decisive = [b for b in battles if b.score_a != 0.5]
    decided = _tally(decisive, models) if decisive else np.zeros_like(wins)
    totals = decided + decided.T
    with np.errstate(invalid="ignore", divide="ignore"):
        win_fraction = np.where(totals > 0, decided / totals, np.nan)
    index = {m: i for i, m in enumerate(models)}
    counts = np.zeros_like(wins)
    for b in battles:
        counts[index[b.model_a], index[b.model_b]] += 1
        counts[index[b.model_b], index[b.model_a]] += 1
    return Leaderboard(models, ratings, lower, upper, counts, win_fraction, online_elo(battles))
