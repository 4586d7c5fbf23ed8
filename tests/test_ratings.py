"""Arena ratings on synthetic battles drawn from known strengths."""

from __future__ import annotations

import numpy as np
import pytest

from judge.ratings import MEAN_RATING, Battle, anonymous, leaderboard, online_elo

TRUE = {"alpha": 1150.0, "bravo": 1080.0, "charlie": 1000.0, "delta": 960.0, "echo": 900.0, "foxtrot": 910.0}


def simulate(true: dict[str, float], battles: int, seed: int) -> list[Battle]:
    """Battles between random pairs, won with Bradley–Terry odds."""
    rng = np.random.default_rng(seed)
    models = list(true)
    out = []
    for _ in range(battles):
        a, b = rng.choice(len(models), 2, replace=False)
        p_a = 1 / (1 + 10 ** ((true[models[b]] - true[models[a]]) / 400))
        out.append(Battle(models[a], models[b], float(rng.random() < p_a)))
    return out


def centred(true: dict[str, float]) -> dict[str, float]:
    shift = MEAN_RATING - sum(true.values()) / len(true)
    return {m: r + shift for m, r in true.items()}


def test_bradley_terry_recovers_the_true_order_and_values() -> None:
    board = leaderboard(simulate(TRUE, 6000, seed=1), rounds=50)
    fitted = dict(zip(board.models, board.ratings, strict=True))
    truth = centred(TRUE)
    assert sorted(fitted, key=fitted.get, reverse=True)[:4] == ["alpha", "bravo", "charlie", "delta"]
    assert all(abs(fitted[m] - truth[m]) < 25 for m in TRUE), (fitted, truth)
    assert abs(np.mean(board.ratings) - MEAN_RATING) < 1e-6


def test_bootstrap_intervals_cover_the_true_ratings_at_about_the_nominal_rate() -> None:
    truth = centred(TRUE)
    covered = total = 0
    for seed in range(12):
        board = leaderboard(simulate(TRUE, 2000, seed=100 + seed), rounds=100, seed=seed)
        for i, model in enumerate(board.models):
            covered += board.lower[i] <= truth[model] <= board.upper[i]
            total += 1
    assert 0.85 <= covered / total <= 1.0, f"{covered}/{total} intervals cover the truth (nominal 95%)"


def test_elo_and_bradley_terry_agree_on_a_clear_cut_order() -> None:
    clear = {"strong": 1300.0, "middle": 1000.0, "weak": 700.0}
    battles = simulate(clear, 3000, seed=7)
    elo = online_elo(battles)
    board = leaderboard(battles, rounds=20)
    by_bt = [board.models[i] for i in np.argsort(-board.ratings)]
    assert sorted(elo, key=elo.get, reverse=True) == by_bt == ["strong", "middle", "weak"]


def test_ties_count_half_and_matrices_count_battles_and_decided_wins() -> None:
    battles = [Battle("a", "b", 1.0), Battle("a", "b", 0.5), Battle("b", "a", 1.0), Battle("a", "c", 0.0)]
    board = leaderboard(battles, rounds=5)
    i = {m: k for k, m in enumerate(board.models)}
    assert board.battles[i["a"], i["b"]] == 3 and board.battles[i["a"], i["c"]] == 1
    assert board.win_fraction[i["a"], i["b"]] == 0.5  # one each; the tie is not a decided battle
    assert board.win_fraction[i["c"], i["a"]] == 1.0
    assert np.isnan(board.win_fraction[i["b"], i["c"]])
    rows = board.rows()
    assert rows[0]["rank"] == 1 and {r["model"] for r in rows} == {"a", "b", "c"}


def test_only_anonymous_battles_count_and_a_bad_winner_is_named() -> None:
    records = [
        {"model_a": "x", "model_b": "y", "winner": "model_a", "anony": True},
        {"model_a": "x", "model_b": "y", "winner": "model_b", "anony": False},
        {"model_a": "x", "model_b": "y", "winner": "tie (bothbad)", "anony": True},
    ]
    assert [b.score_a for b in anonymous(records)] == [1.0, 0.5]
    with pytest.raises(ValueError, match="unknown winner 'left'"):
        anonymous([{"model_a": "x", "model_b": "y", "winner": "left", "anony": True}])
