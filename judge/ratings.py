"""Arena ratings from battles: online Elo, Bradley–Terry with bootstrap confidence intervals,
and the win-fraction and battle-count matrices, each computed as FastChat's
`fastchat/serve/monitor/elo_analysis.py` (0.2.36) computes it.

A battle is FastChat's shape: {"model_a", "model_b", "winner": "model_a" | "model_b" | "tie" |
"tie (bothbad)", "anony": bool, "tstamp"}. Ties count half a win to each side. Ratings are on
the Elo scale: 400 points of difference mean 10:1 odds, and the models' mean rating is 1000.
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
                **_conversation(record),
            }
        )
    return battles


def _conversation(record: dict) -> dict:
    """What the analytics read of a battle: its prompts, each side's answers, its turns, and the
    sides' finish reasons and prompt tokens per turn where the log has them (Corral's does)."""
    sides = [[(role, text) for role, text in state.get("messages", [])] for state in record["states"]]
    prompts = [text for role, text in sides[0] if role == "user"]
    answers = [[text or "" for role, text in side if role == "assistant"] for side in sides]
    return {
        "prompts": prompts,
        "answers_a": answers[0],
        "answers_b": answers[1] if len(answers) > 1 else [],
        "finish_reasons": record.get("finish_reasons") or [[], []],
        "prompt_tokens": record.get("prompt_tokens") or [[], []],
    }


def anonymous(records: Iterable[dict]) -> list[Battle]:
    """The battles that count for ratings: anonymous ones, between two different models, in time
    order (online Elo depends on it; records without a `tstamp` keep their order)."""
    kept = [r for r in records if r.get("anony", False) and r["model_a"] != r["model_b"]]
    kept.sort(key=lambda r: r.get("tstamp", 0))  # stable: equal times keep their order
    return [Battle.from_record(r) for r in kept]


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


def _tally(
    battles: list[Battle], models: list[str], weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(wins, games): wins[i, j] the (weighted) wins of model i over model j, ties counted half
    to each; games[i, j] the (weighted) battles with i as model_a and j as model_b."""
    index = {m: i for i, m in enumerate(models)}
    a = np.array([index[b.model_a] for b in battles], dtype=int)
    c = np.array([index[b.model_b] for b in battles], dtype=int)
    score = np.array([b.score_a for b in battles])
    w = np.ones(len(battles)) if weights is None else weights
    wins = np.zeros((len(models), len(models)))
    games = np.zeros_like(wins)
    np.add.at(wins, (a, c), w * score)
    np.add.at(wins, (c, a), w * (1 - score))
    np.add.at(games, (a, c), w)
    return wins, games


# Bradley–Terry fits: "bt", FastChat 0.2.36's L2-regularised one (the default); "bt-mle", the
# unregularised maximum likelihood of later FastChat (`rating_systems.compute_bt`).
RATING_SYSTEMS = ("bt", "bt-mle")


def _fit(wins: np.ndarray, games: np.ndarray, system: str = "bt", tolerance: float = 1e-10) -> np.ndarray:
    """Bradley–Terry ratings. "bt", as FastChat 0.2.36 defines them (`compute_elo_mle_with_tie`):
    the minimum of scikit-learn's L2-regularised logistic loss (C = 1, no intercept) over the
    battles written twice, a win as two wins and a tie as one win each way; rating = 400 ×
    coefficient + 1000. FastChat's solver stops at its default tolerance, short of that minimum;
    this solves it by Newton's method to `tolerance` (the objective is strictly convex, so the
    minimum is one). "bt-mle": the same likelihood without the penalty (a tie half a win), as
    later FastChat fits it, centred on 1000; a model that never lost (or never won) has no
    finite maximum, and its rating stops after 100 steps, as FastChat's solver does.
    `wins[i, j]` and `games[i, j]`: (weighted) wins of i over j and battles of i as model_a
    against j, ties counted half."""
    ridge = 1.0 if system == "bt" else 0.0
    log_base = math.log(BASE)
    # FastChat's rows: each battle twice, labelled 1 on both for a win of model_a and on one for
    # a tie. A row (a, b, y) costs what (b, a, 1 - y) costs, so summing over both orders of each
    # pair, `rows` battles with `wins` labels each way, counts every battle twice, as FastChat does.
    rows, ones = games + games.T, wins

    def objective(w: np.ndarray) -> float:
        z = log_base * (w[:, None] - w[None, :])
        return float(0.5 * ridge * w @ w + (rows * np.logaddexp(0, z) - ones * z).sum())

    w = np.zeros(wins.shape[0])
    for _ in range(100):
        p = 1 / (1 + np.exp(-log_base * (w[:, None] - w[None, :])))
        residual = rows * p - ones
        gradient = log_base * (residual.sum(axis=1) - residual.sum(axis=0)) + ridge * w
        curvature = log_base**2 * rows * p * (1 - p)
        curvature = curvature + curvature.T
        # Without the penalty the ratings are free up to a constant: the ones/n term fixes their
        # mean (the gradient sums to zero, so no step moves it).
        gauge = ridge * np.eye(len(w)) if ridge else np.ones((len(w), len(w))) / len(w)
        hessian = np.diag(curvature.sum(axis=1)) - curvature + gauge
        step = np.linalg.solve(hessian, gradient)
        before, size = objective(w), 1.0
        while objective(w - size * step) > before and size > 1e-6:  # a damped step far from it
            size /= 2
        w -= size * step
        if np.abs(size * step).max() * SCALE < tolerance:
            break
    return SCALE * w + MEAN_RATING


# How a leaderboard ranks: "position" (FastChat 0.2.36: 1, 2, 3, ... by rating) or "ub" (later
# FastChat's "Rank (UB)": 1 + the models whose interval lies wholly above the model's, so
# models whose intervals overlap share a rank).
RANK_RULES = ("ub", "position")


@dataclass
class Leaderboard:
    models: list[str]
    ratings: np.ndarray  # Bradley–Terry, Elo scale
    lower: np.ndarray  # bootstrap 95% interval
    upper: np.ndarray
    battles: np.ndarray  # battles[i, j]: decided battles between i and j (FastChat's count matrix)
    win_fraction: np.ndarray  # wins of i over j / decided battles between them (NaN when none)
    elo: dict[str, float]
    total: np.ndarray  # each model's battles, ties included (FastChat's num_battles)

    def rows(self) -> list[dict]:
        """By rating, unrounded, with both ranks (RANK_RULES)."""
        order = np.argsort(-self.ratings, kind="stable")
        rows = []
        for position, i in enumerate(order, start=1):
            rows.append(
                {
                    "rank_ub": 1 + int((self.lower > self.upper[i]).sum()),
                    "rank_position": position,
                    "model": self.models[i],
                    "rating": float(self.ratings[i]),
                    "ci_lower": float(self.lower[i]),
                    "ci_upper": float(self.upper[i]),
                    "battles": int(self.total[i]),
                    "elo": float(self.elo[self.models[i]]),
                }
            )
        return rows


def leaderboard(battles: list[Battle], rounds: int = 200, seed: int = 0, system: str = "bt") -> Leaderboard:
    """Bradley–Terry ratings (RATING_SYSTEMS) with percentile bootstrap intervals over `rounds`
    resamples of the battles, the battle and win-fraction matrices, and online Elo for comparison."""
    if system not in RATING_SYSTEMS:
        raise ValueError(f"rating system must be one of {', '.join(RATING_SYSTEMS)}, not {system!r}")
    models = sorted({b.model_a for b in battles} | {b.model_b for b in battles})
    wins, games = _tally(battles, models)
    ratings = _fit(wins, games, system)
    rng = np.random.default_rng(seed)
    samples = np.empty((rounds, len(models)))
    for r in range(rounds):
        weights = rng.multinomial(len(battles), np.full(len(battles), 1 / len(battles))).astype(float)
        samples[r] = _fit(*_tally(battles, models, weights), system)
    lower, upper = np.percentile(samples, [2.5, 97.5], axis=0)
    decisive = [b for b in battles if b.score_a != 0.5]
    decided, decided_games = _tally(decisive, models) if decisive else (np.zeros_like(wins),) * 2
    totals = decided + decided.T
    with np.errstate(invalid="ignore", divide="ignore"):
        win_fraction = np.where(totals > 0, decided / totals, np.nan)
    total = (games + games.T).sum(axis=1)
    counts = decided_games + decided_games.T
    return Leaderboard(models, ratings, lower, upper, counts, win_fraction, online_elo(battles), total)
