"""The `ratings` job: read every arena vote, fit the ratings, and publish the leaderboard where
the gateway's /v1/leaderboard finds it (and as leaderboard.json among the job's artifacts)."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import redis

from broker.keys import Keys
from judge.analytics import (
    Filters,
    by_category,
    clean,
    outlier_voters,
    rated_records,
    statistics,
    style_control,
)
from judge.ratings import RANK_RULES, anonymous, battles_from_log, leaderboard

_PAGE = 1000


def vote_records(client: redis.Redis, keys: Keys) -> Iterator[tuple[str, dict]]:
    """Every record of the arena's votes stream, oldest first, with its stream id."""
    stream, start = keys.arena_log("votes"), "-"
    while True:
        entries = client.xrange(stream, min=start, count=_PAGE)
        for entry_id, fields in entries:
            yield entry_id, json.loads(fields["record"])
        if len(entries) < _PAGE:
            return
        start = "(" + entries[-1][0]


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _board(battles: list[dict], rounds: int, seed: int, rank_rule: str, system: str) -> dict:
    """Ranked rows and the matrices of one set of battles (overall, or a category)."""
    rated = anonymous(battles)
    if not rated:
        return {"battles": 0, "data": [], "models": [], "win_fraction": [], "battle_count": []}
    board = leaderboard(rated, rounds=rounds, seed=seed, system=system)
    rows = [
        {
            "rank": r[f"rank_{rank_rule}"],
            "rank_ub": r["rank_ub"],
            "rank_position": r["rank_position"],
            "model": r["model"],
            "score": r["rating"],
            "ci": [r["ci_lower"], r["ci_upper"]],
            "votes": r["battles"],
            "elo": r["elo"],
        }
        for r in board.rows()
    ]
    return {
        "battles": len(rated),
        "data": rows,
        "models": board.models,
        "win_fraction": [[_finite(v) for v in row] for row in board.win_fraction],
        "battle_count": [[int(v) for v in row] for row in board.battles],
    }


def leaderboard_document(
    records: list[dict],
    rounds: int,
    seed: int,
    rank_rule: str = "ub",
    system: str = "bt",
    filters: Filters | None = None,
) -> dict:
    """The leaderboard as /v1/leaderboard returns it, unrounded (the UI rounds): ranked rows
    (score = Bradley–Terry on the Elo scale, with its bootstrap 95% interval; votes = the
    model's anonymous battles, ties included; rank by `rank_rule`, both ranks beside it) and the
    win-fraction and decided-battle-count matrices in the order of `models`; the same for each
    category; what the clean-battle filters dropped; style-controlled scores; outlier voters;
    and vote statistics (judge/analytics.py)."""
    if rank_rule not in RANK_RULES:
        raise ValueError(f"rank_rule must be one of {', '.join(RANK_RULES)}, not {rank_rule!r}")
    filters = filters or Filters()
    logged = battles_from_log(records)
    cleaned = clean(logged, filters)
    document = {
        "object": "leaderboard",
        "computed_at": time.time(),
        "votes": len(records),
        "bootstrap_rounds": rounds,
        "rank_rule": rank_rule,
        "rating_system": system,
        "category": "overall",
        **_board(cleaned.battles, rounds, seed, rank_rule, system),
        "filters": {"logged": len(logged), "kept": len(cleaned.battles), "dropped": dict(cleaned.dropped)},
        "statistics": statistics(cleaned.battles),
        "categories": {},
        "style_control": None,
        "outlier_voters": [],
    }
    if not document["data"]:
        return document
    document["categories"] = {
        name: _board(battles, rounds, seed, rank_rule, system)
        for name, battles in sorted(by_category(cleaned.battles, filters).items())
    }
    style = style_control(cleaned.battles, rounds=rounds, seed=seed)
    document["style_control"] = {
        "data": sorted(
            (
                {"model": m, "score": float(r), "ci": [float(low), float(high)]}
                for m, r, low, high in zip(style.models, style.ratings, style.lower, style.upper, strict=True)
            ),
            key=lambda row: -row["score"],
        ),
        "coefficients": style.coefficients,
    }
    rated = rated_records(cleaned.battles)
    ratings = {row["model"]: row["score"] for row in document["data"]}
    voters = [b["judge"] for b in rated]
    document["outlier_voters"] = outlier_voters(anonymous(rated), voters, ratings)
    return document


def ratings_job(
    params: dict,
    folder: Path,
    client: redis.Redis,
    keys: Keys,
    default_rounds: int,
    progress: Callable[[str, int, int], None],
    stop: threading.Event,
) -> dict:
    total = client.xlen(keys.arena_log("votes"))
    records: list[dict] = []
    last_id = "0-0"
    for last_id, record in vote_records(client, keys):  # noqa: B007 (the last id is kept)
        records.append(record)
        if len(records) % _PAGE == 0:
            progress("read votes", len(records), total)
    progress("read votes", len(records), total)
    rounds = params.get("bootstrap_rounds") or default_rounds
    progress("fit", 0, 1)
    filters = Filters(
        banned_users=frozenset(params.get("banned_users") or ()),
        daily_vote_cap=params.get("daily_vote_cap", 0),
        long_prompt_tokens=params.get("long_prompt_tokens", 500),
    )
    document = leaderboard_document(
        records,
        rounds,
        params.get("seed", 0),
        params.get("rank_rule", "ub"),
        params.get("rating_system", "bt"),
        filters,
    )
    document["last_vote_id"] = last_id
    progress("fit", 1, 1)
    folder.mkdir(parents=True, exist_ok=True)
    plot_statistics(document["statistics"], folder / "statistics.png")
    encoded = json.dumps(document)
    (folder / "leaderboard.json").write_text(encoded)
    client.set(keys.leaderboard, encoded)
    return {"votes": document["votes"], "battles": document["battles"], "models": len(document["models"])}


def votes_since_leaderboard(client: redis.Redis, keys: Keys) -> bool:
    """Whether votes came in after the published leaderboard was computed (the scheduler's test)."""
    newest = client.xrevrange(keys.arena_log("votes"), count=1)
    if not newest:
        return False
    stored = client.get(keys.leaderboard)
    return stored is None or json.loads(stored).get("last_vote_id") != newest[0][0]


def plot_statistics(stats: dict, path: Path) -> None:
    """Votes per day and battles per model, as a picture beside leaderboard.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (days, models) = plt.subplots(1, 2, figsize=(12, 4))
    days.bar(list(stats["votes_per_day"]), list(stats["votes_per_day"].values()), color="#4c72b0")
    days.set_title("votes per day (UTC)")
    days.tick_params(axis="x", labelrotation=45)
    models.barh(list(stats["battles_per_model"]), list(stats["battles_per_model"].values()), color="#55a868")
    models.set_title("battles per model")
    models.invert_yaxis()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
