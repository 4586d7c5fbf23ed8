"""Statistics of a cleaned data set: turns and lengths per conversation, as JSON and a plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _summary(values: list[int]) -> dict:
    if not values:
        return {"count": 0}
    array = np.asarray(values)
    percentiles = np.percentile(array, [50, 90, 99]).tolist()
    return {
        "count": len(values),
        "mean": float(array.mean()),
        "min": int(array.min()),
        "p50": percentiles[0],
        "p90": percentiles[1],
        "p99": percentiles[2],
        "max": int(array.max()),
    }


def write_stats(folder: Path, tokenizer=None) -> dict:
    """stats.json and stats.png for train.jsonl (and test.jsonl) in `folder`. Lengths are in the
    tokenizer's tokens when one is given, else in characters."""
    unit = "tokens" if tokenizer is not None else "characters"
    stats: dict = {"length_unit": unit}
    turns: dict[str, list[int]] = {}
    lengths: dict[str, list[int]] = {}
    for split in ("train", "test"):
        path = folder / f"{split}.jsonl"
        if not path.exists():
            continue
        turns[split], lengths[split] = [], []
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                record = json.loads(line)
                conversation = record.get("conversations") or [
                    {"value": m["content"]} for m in record.get("messages", [])
                ]
                text = [t["value"] for t in conversation]
                turns[split].append(len(text))
                if tokenizer is not None:
                    lengths[split].append(
                        sum(len(tokenizer.encode(t, add_special_tokens=False)) for t in text)
                    )
                else:
                    lengths[split].append(sum(map(len, text)))
        stats[split] = {"turns": _summary(turns[split]), unit: _summary(lengths[split])}
    (folder / "stats.json").write_text(json.dumps(stats, indent=1))
    _plot(folder / "stats.png", turns, lengths, unit)
    return stats


def _plot(path: Path, turns: dict[str, list[int]], lengths: dict[str, list[int]], unit: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    shown = [split for split in turns if turns[split]]  # an empty split gets no legend entry
    for split in shown:
        # One bar per turn count, centred on it.
        left.hist(turns[split], bins=np.arange(0.5, max(turns[split]) + 1.5), alpha=0.6, label=split)
        right.hist(lengths[split], bins=50, alpha=0.6, label=split)
    left.set(title="Turns per conversation", xlabel="turns", ylabel="conversations")
    right.set(title=f"Length per conversation ({unit})", xlabel=unit, ylabel="conversations")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))  # turns are whole numbers
    for axes in (left, right):
        axes.yaxis.set_major_locator(MaxNLocator(integer=True))
        if len(shown) > 1:
            axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
