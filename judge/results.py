"""Results from judgment files: mean scores per model and turn with 95% intervals and per
category (single grading); wins, losses, ties and the adjusted win rate (pairwise); agreement
between two judges, a judge and human labels, or humans among themselves, in MT-bench's
human-judgment format. FastChat's own judgment files (`model_judgment/*_single.jsonl` and
`*_pair.jsonl`) are read as its `show_result.py` reads them, and agreement is counted as its
`compute_agreement.py` counts it. Numbers are unrounded."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from judge.answers import read_jsonl


def _interval(scores: list[float]) -> tuple[float, float, float]:
    """Mean and a normal-approximation 95% interval (1.96 standard errors)."""
    mean = float(np.mean(scores))
    if len(scores) < 2:
        return mean, mean, mean
    half = 1.96 * float(np.std(scores, ddof=1)) / math.sqrt(len(scores))
    return mean, mean - half, mean + half


def from_fastchat(record: dict) -> dict:
    """A judgment record in Corral's shape. FastChat writes a rating it could not read as -1, and
    a pair as `g1_winner` and `g2_winner` (each "model_1", "model_2", "tie" or "error", the second
    game already in the first's terms) with no `winner`: a pair with an "error" is a failure, one
    whose games disagree or say tie is a tie (show_result.py's rules)."""
    if record.get("score") == -1:
        return {**record, "score": None, "parse_failure": "FastChat could not read the rating (-1)"}
    if "winner" not in record and "g1_winner" in record:
        g1, g2 = record["g1_winner"], record.get("g2_winner", record["g1_winner"])
        if "error" in (g1, g2):
            return {**record, "winner": None, "parse_failure": "FastChat could not read a verdict (error)"}
        return {**record, "winner": "tie" if g1 == "tie" or g1 != g2 else g1}
    return record


def single(records: list[dict], categories: dict) -> list[dict]:
    """Per model: overall and per-turn mean scores with intervals, per-category means, and the
    parse failures (left out of every mean)."""
    by_model: dict[str, list[dict]] = defaultdict(list)
    for r in map(from_fastchat, records):
        by_model[r["model"]].append(r)
    rows = []
    for model, rs in by_model.items():
        scored = [r for r in rs if r["score"] is not None]
        row: dict = {"model": model, "judged": len(rs), "parse_failures": len(rs) - len(scored)}
        if scored:
            mean, low, high = _interval([r["score"] for r in scored])
            row.update(score=mean, ci=[low, high])
            for turn in (1, 2):
                turn_scores = [r["score"] for r in scored if r["turn"] == turn]
                if turn_scores:
                    mean, low, high = _interval(turn_scores)
                    row[f"turn_{turn}"] = {"score": mean, "ci": [low, high]}
            per_category: dict[str, list[float]] = defaultdict(list)
            for r in scored:
                per_category[categories.get(r["question_id"], "?")].append(r["score"])
            row["categories"] = {c: float(np.mean(v)) for c, v in sorted(per_category.items())}
        rows.append(row)
    return sorted(rows, key=lambda r: -r.get("score", -1))


def pairwise(records: list[dict]) -> list[dict]:
    """Per model: wins, losses and ties over its judged pairs (inconsistent orders count as
    ties), the win rate and the adjusted win rate (a tie counts half)."""
    tally: dict[str, dict[str, int]] = defaultdict(lambda: {"wins": 0, "losses": 0, "ties": 0, "failures": 0})
    for r in map(from_fastchat, records):
        m1, m2, winner = r["model_1"], r["model_2"], r.get("winner")
        if winner is None:
            tally[m1]["failures"] += 1
            tally[m2]["failures"] += 1
        elif winner == "tie":
            tally[m1]["ties"] += 1
            tally[m2]["ties"] += 1
        else:
            won, lost = (m1, m2) if winner == "model_1" else (m2, m1)
            tally[won]["wins"] += 1
            tally[lost]["losses"] += 1
    rows = []
    for model, t in tally.items():
        games = t["wins"] + t["losses"] + t["ties"]
        win_rate = t["wins"] / games if games else None
        adjusted = (t["wins"] + 0.5 * t["ties"]) / games if games else None
        rows.append({"model": model, **t, "win_rate": win_rate, "adjusted_win_rate": adjusted})
    return sorted(rows, key=lambda r: -(r["adjusted_win_rate"] or 0))


# Votes on one item: (turn, question, the pair's two models in name order) → (voter, winner named,
# "tie" for a tie of any kind) for each vote.
Votes = dict[tuple, list[tuple[str, str]]]


def _voter(record: dict) -> str | None:
    """Who cast a vote, as compute_agreement.py names them: MT-bench's experts are "human" (as is
    a human-format record without a judge), its authors "author" (left out of agreement, as
    there); a judgment file's own records, and any other judge, "judge"."""
    judge = record.get("judge")
    if "model_1" in record:
        return "judge"
    if judge is None or (isinstance(judge, str) and judge.startswith("expert")):
        return "human"
    return None if isinstance(judge, str) and judge.startswith("author") else "judge"


def _votes(records: list[dict]) -> Votes:
    out: Votes = defaultdict(list)
    for record in map(from_fastchat, records):
        if "model_1" in record:
            a, b, winner = record["model_1"], record["model_2"], record.get("winner")
            name = {"model_1": a, "model_2": b, "tie": "tie"}.get(winner) if winner else None
        else:
            a, b, winner = record["model_a"], record["model_b"], record["winner"]
            name = {"model_a": a, "model_b": b}.get(winner, "tie" if "tie" in winner else None)
        voter = _voter(record)
        if name is not None and voter is not None:
            out[(record.get("turn", 1), record["question_id"], *sorted((a, b)))].append((voter, name))
    return out


def _count(pairs: list[tuple[str, str]]) -> dict:
    """Agreement over vote pairs, with ties (a tie equals a tie) and without (pairs where neither
    vote is a tie)."""
    decisive = [(x, y) for x, y in pairs if "tie" not in (x, y)]
    return {
        "with_ties": sum(x == y for x, y in pairs) / len(pairs) if pairs else None,
        "shared": len(pairs),
        "without_ties": sum(x == y for x, y in decisive) / len(decisive) if decisive else None,
        "decisive": len(decisive),
    }


def agreement(first: list[dict], second: list[dict] | None = None) -> dict:
    """How often two judges (or a judge and humans) name the same winner, counting every pair of
    their votes on an item (a judge's one vote against each human's); with no `second`, how often
    the humans of `first` agree among themselves (every two human votes on an item). Per turn and
    pooled, with ties and without, as compute_agreement.py counts."""
    ours = _votes(first)
    theirs = _votes(second) if second is not None else {}
    per_turn: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for key, cast in ours.items():
        if second is None:
            humans = [winner for voter, winner in cast if voter == "human"]
            pairs = [(humans[i], humans[j]) for i in range(len(humans)) for j in range(i + 1, len(humans))]
        else:
            pairs = [(x, y) for _, x in cast for _, y in theirs.get(key, [])]
        per_turn[key[0]] += pairs
    pooled = [pair for pairs in per_turn.values() for pair in pairs]
    return {
        "mode": "human-human" if second is None else "pair",
        **_count(pooled),
        "turns": {str(turn): _count(pairs) for turn, pairs in sorted(per_turn.items())},
    }


def summarize(output: Path, judgment_path: Path, mode: str, questions: list) -> dict:
    """results.json and results.png beside the judgments; returns the summary."""
    records = read_jsonl(judgment_path)
    categories = {q.question_id: q.category for q in questions}
    rows = single(records, categories) if mode == "single" else pairwise(records)
    failures = sum(bool(r.get("parse_failure")) for r in records)
    summary = {
        "mode": mode,
        "judgments": len(records),
        "parse_failures": failures,
        "models": rows,
        "file": str(judgment_path),
    }
    warning = parse_warning(len(records), failures)
    if warning:
        summary["warning"] = warning
    (output / "results.json").write_text(json.dumps(summary, indent=2))
    plot(rows, mode, output / "results.png")
    return summary


# Judges that follow the verdict format reliably (README, "Judging"); a small model does not.
STRONG_JUDGES = "gpt-4o, Claude, Llama-3.1-70B-Instruct or Qwen2.5-72B-Instruct"


def parse_warning(judgments: int, failures: int) -> str | None:
    """What to tell people when most judgments could not be read (None when most could)."""
    if not judgments or failures * 2 < judgments:
        return None
    what = "All" if failures == judgments else f"{failures} of"
    return (
        f"{what} {judgments} judgments failed to parse: the judge did not write its verdict in the "
        f"asked format, so there is little or nothing to score. Small models rarely can; use a "
        f"stronger judge, such as {STRONG_JUDGES}."
    )


def plot(rows: list[dict], mode: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4))
    scored = (
        any(r.get("categories") for r in rows)
        if mode == "single"
        else any(r["wins"] + r["ties"] + r["losses"] for r in rows)
    )
    if not scored:
        axes.axis("off")
        axes.text(
            0.5,
            0.5,
            "no judgment could be parsed: nothing to plot\n(see results.json's warning)",
            ha="center",
            va="center",
            fontsize=12,
        )
    elif mode == "single":
        categories = sorted({c for r in rows for c in r.get("categories", {})})
        width = 0.8 / max(len(rows), 1)
        for i, row in enumerate(rows):
            values = [row.get("categories", {}).get(c, 0) for c in categories]
            axes.bar(np.arange(len(categories)) + i * width, values, width, label=row["model"])
        axes.set_xticks(np.arange(len(categories)) + 0.4 - width / 2, categories, rotation=30, ha="right")
        axes.set_ylim(0, 10)
        axes.set_ylabel("mean score (1–10)")
        axes.legend(fontsize=8)
    else:
        names = [r["model"] for r in rows]
        axes.barh(names, [r["wins"] for r in rows], label="wins")
        axes.barh(names, [r["ties"] for r in rows], left=[r["wins"] for r in rows], label="ties")
        axes.barh(
            names, [r["losses"] for r in rows], left=[r["wins"] + r["ties"] for r in rows], label="losses"
        )
        axes.legend(fontsize=8)
        axes.set_xlabel("judged pairs")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
