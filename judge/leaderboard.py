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


def leaderboard_document(
    records: list[dict], rounds: int, seed: int, rank_rule: str = "ub", system: str = "bt"
) -> dict:
    """The leaderboard as /v1/leaderboard returns it, unrounded (the UI rounds): ranked rows
    (score = Bradley–Terry on the Elo scale, with its bootstrap 95% interval; votes = the
    model's anonymous battles, ties included; rank by `rank_rule`, both ranks beside it) and the
    win-fraction and decided-battle-count matrices in the order of `models`."""
    if rank_rule not in RANK_RULES:
        raise ValueError(f"rank_rule must be one of {', '.join(RANK_RULES)}, not {rank_rule!r}")
    battles = anonymous(battles_from_log(records))
    document = {
        "object": "leaderboard",
        "computed_at": time.time(),
        "votes": len(records),
        "battles": len(battles),
        "bootstrap_rounds": rounds,
        "rank_rule": rank_rule,
        "rating_system": system,
        "data": [],
        "models": [],
        "win_fraction": [],
        "battle_count": [],
    }
    if not battles:
        return document
    board = leaderboard(battles, rounds=rounds, seed=seed, system=system)
    document["data"] = [
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
    document["models"] = board.models
    document["win_fraction"] = [[_finite(v) for v in row] for row in board.win_fraction]
    document["battle_count"] = [[int(v) for v in row] for row in board.battles]
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
    document = leaderboard_document(
        records,
        rounds,
        params.get("seed", 0),
        params.get("rank_rule", "ub"),
        params.get("rating_system", "bt"),
    )
    document["last_vote_id"] = last_id
    progress("fit", 1, 1)
    folder.mkdir(parents=True, exist_ok=True)
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
