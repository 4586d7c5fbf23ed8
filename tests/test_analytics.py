"""Arena analytics on crafted vote logs: each clean-battle filter drops what it should and counts
it, categories, style control shrinking a longer-answer bias, outlier voters, statistics, and the
leaderboard document that carries them."""

from __future__ import annotations

import numpy as np

from judge.analytics import Filters, by_category, clean, style_control
from judge.leaderboard import leaderboard_document
from judge.ratings import battles_from_log

VOTES = {"a": "leftvote", "b": "rightvote", "tie": "tievote"}
DAY = 86_400.0


def record(
    model_a: str,
    model_b: str,
    winner: str,
    answers: tuple[str, str] = ("An answer.", "Another answer."),
    prompts: tuple[str, ...] = ("Tell me something.",),
    user: str = "u1",
    tstamp: float = 1.7e9,
    finish: tuple[str, str] = ("stop", "stop"),
    tokens: tuple[int, int] | None = None,
) -> dict:
    """One anonymous battle vote in the log's shape (every turn gets the same answers)."""

    def state(model: str, answer: str) -> dict:
        messages = [pair for prompt in prompts for pair in (["user", prompt], ["assistant", answer])]
        return {"messages": messages, "model_name": model}

    return {
        "tstamp": tstamp,
        "type": VOTES[winner],
        "models": ["", ""],
        "states": [state(model_a, answers[0]), state(model_b, answers[1])],
        "ip": user,
        "finish_reasons": [[finish[0]] * len(prompts), [finish[1]] * len(prompts)],
        **({"prompt_tokens": [[tokens[0]] * len(prompts), [tokens[1]] * len(prompts)]} if tokens else {}),
    }


def test_each_filter_drops_its_battles_and_counts_them_by_reason() -> None:
    records = [
        record("m1", "m2", "a"),  # kept
        record("m1", "m2", "a", answers=("As ChatGPT, made by OpenAI, I think so.", "Yes.")),
        record("alpha-7b", "m2", "b", answers=("Alpha here: yes.", "No.")),  # names its own model
        record("m1", "m2", "a", answers=("NETWORK ERROR DUE TO HIGH TRAFFIC.", "Fine.")),
        record("m1", "m2", "a", answers=("", "Fine.")),
        record("m1", "m2", "a", finish=("stop", "error: the worker was lost")),
        record("m1", "m2", "a", finish=("stop", "length")),  # cut by max_tokens: judged as shown
        record("m1", "m2", "a", user="spammer"),
        *(record("m1", "m2", "b", user="busy", tstamp=1.7e9 + i) for i in range(5)),
        record("m1", "m2", "b", user="busy", tstamp=1.7e9 + DAY),  # the next day counts again
    ]
    cleaned = clean(battles_from_log(records), Filters(banned_users=frozenset({"spammer"}), daily_vote_cap=3))
    assert dict(cleaned.dropped) == {
        "identity_leak": 2,
        "error_text": 2,
        "unfinished": 1,
        "banned_user": 1,
        "daily_vote_cap": 2,
    }
    assert len(cleaned.battles) == 1 + 1 + 3 + 1
    assert len(cleaned.battles) + sum(cleaned.dropped.values()) == len(records)  # nothing lost


def test_categories_find_language_long_prompts_multi_turn_and_code() -> None:
    records = [
        record(
            "m1", "m2", "a", prompts=("Quelle est la capitale de la France et pourquoi est-elle si belle ?",)
        ),
        record("m1", "m2", "a", prompts=("word " * 400,)),  # no token counts: 533 by its words
        record("m1", "m2", "a", prompts=("Summarise this.",), tokens=(510, 640)),  # a long history
        record("m1", "m2", "a", prompts=("word " * 400,), tokens=(420, 480)),  # counted: not long
        record("m1", "m2", "a", prompts=("Hello there, how are you?", "And tomorrow?")),
        record("m1", "m2", "a", prompts=("Fix it:\ndef f(x):\n    return x\nimport os",)),
        record("m1", "m2", "a", answers=("```python\nprint(1)\n```", "Use print.")),
    ]
    grouped = by_category(battles_from_log(records), Filters(long_prompt_tokens=500))
    count = {name: len(battles) for name, battles in grouped.items()}
    assert count["language:fr"] == 1 and count["long_prompt"] == 2 and count["multi_turn"] == 1
    assert count["coding"] == 2 and count["language:en"] >= 3


def crafted_length_bias(seed: int) -> list[dict]:
    """Two models of equal strength; voters prefer the longer answer, and `wordy` answers long
    more often: the plain score favours `wordy`, style control should mostly take that away."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(1500):
        a, b = ("wordy", "terse") if rng.random() < 0.5 else ("terse", "wordy")
        lengths = {m: int(rng.integers(60, 200) if m == "wordy" else rng.integers(10, 120)) for m in (a, b)}
        p_a = 1 / (1 + np.exp(-3 * (lengths[a] - lengths[b]) / (lengths[a] + lengths[b])))
        winner = "a" if rng.random() < p_a else "b"
        answers = ("word " * lengths[a], "word " * lengths[b])
        records.append(record(a, b, winner, answers=answers, user=f"u{i % 50}", tstamp=1.7e9 + i))
    return records


def test_style_control_shrinks_a_longer_answer_bias() -> None:
    battles = battles_from_log(crafted_length_bias(seed=4))
    plain = leaderboard_document(crafted_length_bias(seed=4), rounds=20, seed=0)
    gap = {row["model"]: row["score"] for row in plain["data"]}
    style = style_control(battles, rounds=50, seed=0)
    styled = dict(zip(style.models, style.ratings, strict=True))
    assert gap["wordy"] - gap["terse"] > 60  # length wins votes
    assert abs(styled["wordy"] - styled["terse"]) < (gap["wordy"] - gap["terse"]) / 3
    assert style.coefficients["length"] > 0.5  # and style control puts it on length
    # Each styled score lies inside its bootstrap interval, which is a real interval.
    assert np.all(style.lower < style.ratings) and np.all(style.ratings < style.upper)
    assert np.all(style.upper - style.lower < 200)


def test_an_outlier_voter_who_votes_against_the_ratings_is_reported() -> None:
    rng = np.random.default_rng(1)
    records = []
    for i in range(600):
        strong_left = rng.random() < 0.5
        pair = ("strong", "weak") if strong_left else ("weak", "strong")
        user = "contrarian" if i % 10 == 0 else f"u{i % 7}"
        picks_strong = rng.random() < (0.1 if user == "contrarian" else 0.85)
        winner = "a" if picks_strong == strong_left else "b"
        records.append(record(*pair, winner, user=user, tstamp=1.7e9 + i))
    document = leaderboard_document(records, rounds=10, seed=0)
    assert [row["user"] for row in document["outlier_voters"]] == ["contrarian"]


def test_the_leaderboard_document_carries_categories_filters_style_and_statistics() -> None:
    leak = record("wordy", "terse", "a", answers=("I am SmolLM, by Hugging Face.", "Hi."), tstamp=1.8e9)
    records = [*crafted_length_bias(seed=5)[:300], leak]
    document = leaderboard_document(records, rounds=10, seed=0)
    assert document["filters"] == {"logged": 301, "kept": 300, "dropped": {"identity_leak": 1}}
    assert document["battles"] == 300 and {row["model"] for row in document["data"]} == {"wordy", "terse"}
    assert document["categories"]["language:en"]["battles"] <= 300
    assert {row["model"] for row in document["style_control"]["data"]} == {"wordy", "terse"}
    assert all(
        low < row["score"] < high for row in document["style_control"]["data"] for low, high in [row["ci"]]
    )
    stats = document["statistics"]
    assert sum(stats["votes_per_day"].values()) == 300 and stats["users"] == 50
    assert stats["battles_per_model"] == {"wordy": 300, "terse": 300}
