"""Results from judgment files: mean scores per model and turn with 95% intervals and per
category (single grading); wins, losses, ties and the adjusted win rate (pairwise); agreement
between two judges, or a judge and human labels in MT-bench's human-judgment format."""

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


def single(records: list[dict], categories: dict) -> list[dict]:
    """Per model: overall and per-turn mean scores with intervals, per-category means, and the
    parse failures (left out of every mean)."""
    by_model: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_model[r["model"]].append(r)
    rows = []
    for model, rs in by_model.items():
        scored = [r for r in rs if r["score"] is not None]
        row: dict = {"model": model, "judged": len(rs), "parse_failures": len(rs) - len(scored)}
        if scored:
            mean, low, high = _interval([r["score"] for r in scored])
            row.update(score=round(mean, 3), ci=[round(low, 3), round(high, 3)])
            for turn in (1, 2):
                turn_scores = [r["score"] for r in scored if r["turn"] == turn]
                if turn_scores:
                    mean, low, high = _interval(turn_scores)
                    row[f"turn_{turn}"] = {"score": round(mean, 3), "ci": [round(low, 3), round(high, 3)]}
            per_category: dict[str, list[float]] = defaultdict(list)
            for r in scored:
                per_category[categories.get(r["question_id"], "?")].append(r["score"])
            row["categories"] = {c: round(float(np.mean(v)), 3) for c, v in sorted(per_category.items())}
        rows.append(row)
    return sorted(rows, key=lambda r: -r.get("score", -1))


def pairwise(records: list[dict]) -> list[dict]:
    """Per model: wins, losses and ties over its judged pairs (inconsistent orders count as
    ties), the win rate and the adjusted win rate (a tie counts half)."""
    tally: dict[str, dict[str, int]] = defaultdict(lambda: {"wins": 0, "losses": 0, "ties": 0, "failures": 0})
    for r in records:
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
        win_rate = round(t["wins"] / games, 4) if games else None
        adjusted = round((t["wins"] + 0.5 * t["ties"]) / games, 4) if games else None
        rows.append({"model": model, **t, "win_rate": win_rate, "adjusted_win_rate": adjusted})
    return sorted(rows, key=lambda r: -(r["adjusted_win_rate"] or 0))


def _outcomes(records: list[dict]) -> dict[tuple, str]:
    """(question, model pair in name order, turn) → the winner's name or "tie", from Corral's
    pair judgments or MT-bench human judgments ({"model_a", "model_b", "winner": "model_a" |
    "model_b" | "tie"}); records without an outcome are left out."""
    out = {}
    for r in records:
        if "model_1" in r:
            a, b, winner = r["model_1"], r["model_2"], r.get("winner")
            name = {"model_1": a, "model_2": b, "tie": "tie"}.get(winner) if winner else None
        else:
            a, b, winner = r["model_a"], r["model_b"], r["winner"]
            name = {"model_a": a, "model_b": b}.get(winner, "tie" if winner.startswith("tie") else None)
        if name is not None:
            out[(r["question_id"], tuple(sorted((a, b))), r.get("turn", 1))] = name
    return out


def agreement(first: list[dict], second: list[dict]) -> dict:
    """How often two judges (or a judge and humans) pick the same outcome on the pairs both
    judged: with ties (all shared pairs) and without (pairs where neither said tie)."""
    a, b = _outcomes(first), _outcomes(second)
    shared = sorted(set(a) & set(b), key=str)
    decisive = [k for k in shared if a[k] != "tie" and b[k] != "tie"]

    def rate(keys: list) -> float | None:
        return round(sum(a[k] == b[k] for k in keys) / len(keys), 4) if keys else None

    return {
        "with_ties": rate(shared),
        "shared": len(shared),
        "without_ties": rate(decisive),
        "decisive": len(decisive),
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
