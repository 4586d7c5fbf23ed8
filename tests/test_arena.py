"""The arena API against real workers: anonymous and named battles streamed from both sides, one
vote per battle, reveal after the vote, limits, the FastChat-shaped export, and the leaderboard
recomputed as a queued job."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections import Counter

import httpx
import pytest
import redis

from broker.keys import Keys
from broker.settings import Settings
from judge.ratings import anonymous, battles_from_log, leaderboard
from tests.conftest import MODEL, MODEL_INFO, TWIN, TWIN_INFO, Stack
from workers.loading import builtin_metadata

PROMPT = "Name a colour of the sky."


def new_battle(url: str, **body) -> dict:
    response = httpx.post(f"{url}/v1/arena/battles", json=body, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def play(url: str, battle_id: str, content: str = PROMPT, max_tokens: int = 12) -> list[dict]:
    """One turn at temperature 0; the SSE events in order."""
    body = {"content": content, "temperature": 0, "max_tokens": max_tokens}
    events = []
    with httpx.stream("POST", f"{url}/v1/arena/battles/{battle_id}/turns", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read().decode()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    return events


def vote(url: str, battle_id: str, choice: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/arena/battles/{battle_id}/vote", json={"vote": choice}, timeout=10)


def side_texts(events: list[dict]) -> dict[str, str]:
    return {
        side: "".join(e.get("text", "") for e in events if e.get("side") == side)
        for side in ("left", "right")
    }


def test_anonymous_battle_streams_both_sides_and_reveals_models_only_after_the_vote(arena_stack, greedy):
    url = arena_stack.url
    battle = new_battle(url)
    assert battle["mode"] == "anonymous" and battle["models"] is None

    first = play(url, battle["id"])
    texts = side_texts(first)
    expected, _, _ = greedy([{"role": "user", "content": PROMPT}], 12)
    assert texts == {"left": expected, "right": expected}  # both are SmolLM2, through the chat path
    assert {e["side"] for e in first if "finish_reason" in e} == {"left", "right"}
    assert first[-1] == {"turn": 1, "done": True}

    second = play(url, battle["id"], "And of grass?")
    history = [
        {"role": "user", "content": PROMPT},
        {"role": "assistant", "content": expected},
        {"role": "user", "content": "And of grass?"},
    ]
    assert side_texts(second)["left"] == greedy(history, 12)[0]  # turn 2 sees turn 1

    hidden = httpx.get(f"{url}/v1/arena/battles/{battle['id']}", timeout=10).json()
    assert hidden["models"] is None and len(hidden["turns"]) == 2 and hidden["model_info"] is None

    voted = vote(url, battle["id"], "left")
    assert voted.status_code == 200, voted.text
    assert sorted(voted.json()["models"]) == sorted([MODEL, TWIN])
    assert voted.json()["vote"] == "left"
    # Revealed with what the workers say about the models (a YAML file for one, flags for the
    # other), on top of what the built-in model says about itself.
    info = dict(zip(voted.json()["models"], voted.json()["model_info"], strict=True))
    own = builtin_metadata(MODEL)
    assert own["organization"] and own["license"] == "Apache-2.0"
    assert info == {MODEL: {**own, **MODEL_INFO}, TWIN: {**own, **TWIN_INFO}}
    cards = {m["id"]: m for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]}
    assert cards[TWIN]["metadata"] == info[TWIN] and cards[MODEL]["metadata"] == info[MODEL]


def test_a_second_vote_an_unknown_battle_and_an_unplayed_one_are_rejected(arena_stack):
    url = arena_stack.url
    unknown = vote(url, "no-such-battle", "tie")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "battle_not_found"

    battle = new_battle(url)
    unplayed = vote(url, battle["id"], "tie")
    assert unplayed.status_code == 400 and unplayed.json()["error"]["code"] == "no_turns"

    play(url, battle["id"], max_tokens=4)
    assert vote(url, battle["id"], "tie").status_code == 200
    again = vote(url, battle["id"], "right")
    assert again.status_code == 409 and again.json()["error"]["code"] == "already_voted"
    assert httpx.get(f"{url}/v1/arena/battles/{battle['id']}", timeout=10).json()["vote"] == "tie"
    after = httpx.post(f"{url}/v1/arena/battles/{battle['id']}/turns", json={"content": "more"}, timeout=10)
    assert after.status_code == 409 and after.json()["error"]["code"] == "battle_voted"


def test_anonymous_pairs_are_two_distinct_models_in_random_order(arena_stack):
    battles = [new_battle(arena_stack.url) for _ in range(30)]
    assert all(b["models"] is None for b in battles)
    # Until a vote the order shows only in the battles' hashes.
    client = redis.Redis.from_url(arena_stack.redis_url, decode_responses=True)
    pairs = [
        tuple(json.loads(client.hget(Keys(arena_stack.key_prefix).battle(b["id"]), "models")))
        for b in battles
    ]
    orders = Counter(pairs)
    assert set(orders) == {(MODEL, TWIN), (TWIN, MODEL)}, orders


def test_weights_can_keep_a_model_out_of_anonymous_battles(arena_stack):
    url = arena_stack.start_gateway(CORRAL_ARENA_WEIGHTS=json.dumps({TWIN: 0}))
    response = httpx.post(f"{url}/v1/arena/battles", json={}, timeout=10)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "not_enough_models"
    assert MODEL in response.json()["error"]["message"]


def test_named_battle_shows_its_models_from_the_start(arena_stack):
    url = arena_stack.url
    battle = new_battle(url, mode="named", models=[TWIN, MODEL])
    assert battle["models"] == [TWIN, MODEL]
    missing = httpx.post(
        f"{url}/v1/arena/battles", json={"mode": "named", "models": [MODEL, "nope"]}, timeout=10
    )
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"
    no_models = httpx.post(f"{url}/v1/arena/battles", json={"mode": "named"}, timeout=10)
    assert no_models.status_code == 400 and no_models.json()["error"]["param"] == "models"


def test_input_turn_and_vote_limits_answer_with_clear_errors(arena_stack):
    url = arena_stack.start_gateway(CORRAL_ARENA_MAX_INPUT_CHARS="40", CORRAL_ARENA_MAX_TURNS="1")
    battle = new_battle(url)
    long = httpx.post(f"{url}/v1/arena/battles/{battle['id']}/turns", json={"content": "x" * 41}, timeout=10)
    assert long.status_code == 400 and long.json()["error"]["code"] == "input_too_long"
    assert "at most 40" in long.json()["error"]["message"]
    play(url, battle["id"], max_tokens=2)
    more = httpx.post(f"{url}/v1/arena/battles/{battle['id']}/turns", json={"content": "again"}, timeout=10)
    assert more.status_code == 400 and more.json()["error"]["code"] == "conversation_limit"

    # Votes are counted per user (here a fresh API key) across gateways, per clock hour.
    key = uuid.uuid4().hex
    url = arena_stack.start_gateway(CORRAL_ARENA_VOTES_PER_HOUR="2", CORRAL_API_KEYS=key)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    body = {"model": MODEL, "messages": chat, "vote": "up"}
    auth = {"Authorization": f"Bearer {key}"}
    codes = [httpx.post(f"{url}/v1/arena/feedback", json=body, headers=auth, timeout=10) for _ in range(3)]
    assert [r.status_code for r in codes] == [200, 200, 429]
    assert codes[2].json()["error"]["code"] == "vote_limit_exceeded"
    assert int(codes[2].headers["Retry-After"]) > 0


def test_export_is_fastchat_shaped_and_round_trips_to_the_same_battles(arena_stack, tmp_path):
    url = arena_stack.url
    cast = []
    for choice in ("left", "right", "tie"):
        battle = new_battle(url)
        play(url, battle["id"], max_tokens=3)
        cast.append(vote(url, battle["id"], choice).json())
    named = new_battle(url, mode="named", models=[MODEL, TWIN])
    play(url, named["id"], max_tokens=3)
    vote(url, named["id"], "right")
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    httpx.post(f"{url}/v1/arena/feedback", json={"model": TWIN, "messages": chat, "vote": "flag"}, timeout=10)

    out = tmp_path / "arena.jsonl"
    cli = subprocess.run(
        [sys.executable, "-m", "corral", "arena", "export", "--url", url, "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 0, cli.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    by_battle = {r["battle_id"]: r for r in records if r["type"] in ("leftvote", "rightvote", "tievote")}
    for voted, winner in zip(cast, ("leftvote", "rightvote", "tievote"), strict=True):
        record = by_battle[voted["id"]]
        assert record["type"] == winner and record["models"] == ["", ""]
        assert [s["model_name"] for s in record["states"]] == voted["models"]
        turn = voted["turns"][0]
        assert record["states"][0]["messages"] == [["user", turn["prompt"]], ["assistant", turn["left"]]]
        # Each side's prompt tokens for its one turn (the long-prompt category counts them).
        assert [len(side) for side in record["prompt_tokens"]] == [1, 1]
        assert all(5 < n < 200 for side in record["prompt_tokens"] for n in side), record["prompt_tokens"]
    assert by_battle[named["id"]]["models"] == [MODEL, TWIN]
    assert any(r["type"] == "flag" and r["model"] == TWIN for r in records)
    chats = [r for r in records if r["type"] == "chat" and r["battle_id"] == named["id"]]
    assert [c["model"] for c in chats] == [MODEL, TWIN]

    battles = battles_from_log(records)
    mine = [b for b in battles if b["tstamp"] >= cast[0]["created_at"]]
    assert [(b["winner"], b["anony"]) for b in mine] == [
        ("model_a", True),
        ("model_b", True),
        ("tie", True),
        ("model_b", False),
    ]
    assert [(b["model_a"], b["model_b"]) for b in mine[:3]] == [tuple(v["models"]) for v in cast]


def test_leaderboard_is_recomputed_by_a_queued_job_on_demand_and_when_votes_arrive(arena_stack):
    url = arena_stack.url
    for choice in ("left", "right", "left"):
        battle = new_battle(url)
        play(url, battle["id"], max_tokens=2)
        vote(url, battle["id"], choice)
    job = httpx.post(f"{url}/v1/leaderboard/refresh", timeout=10)
    assert job.status_code == 202 and job.json()["kind"] == "ratings"
    finished = wait_for_job(url, job.json()["id"])
    assert finished["status"] == "succeeded", finished

    board = httpx.get(f"{url}/v1/leaderboard", timeout=10).json()
    export = httpx.get(f"{url}/v1/arena/export", params={"include": "votes"}, timeout=30)
    battles = anonymous(battles_from_log(json.loads(line) for line in export.text.splitlines()))
    assert board["battles"] == len(battles) >= 3
    assert [row["model"] for row in board["data"]] and {r["model"] for r in board["data"]} == {MODEL, TWIN}
    expected = leaderboard(battles, rounds=20, seed=0)
    for row in board["data"]:
        i = expected.models.index(row["model"])
        assert row["score"] == pytest.approx(expected.ratings[i], abs=0.1)
        assert row["ci"][0] <= row["score"] <= row["ci"][1]
        assert row["votes"] == len(battles)  # both models are in every battle
        assert row["rank"] >= 1
        assert row["metadata"]["license"] == "Apache-2.0"
    decided = sum(b.score_a != 0.5 for b in battles)  # FastChat's count matrix leaves ties out
    assert board["battle_count"] == [[0, decided], [decided, 0]]
    assert board["rank_rule"] == "ub" and all(r["rank"] == r["rank_ub"] for r in board["data"])
    by_position = httpx.get(f"{url}/v1/leaderboard", params={"rank_rule": "position"}, timeout=10).json()
    assert [r["rank"] for r in by_position["data"]] == [1, 2] and by_position["rank_rule"] == "position"
    assert board["filters"]["logged"] == board["filters"]["kept"] + sum(board["filters"]["dropped"].values())
    for name, sub in board["categories"].items():  # each category's board, by name
        one = httpx.get(f"{url}/v1/leaderboard", params={"category": name}, timeout=10).json()
        assert one["category"] == name and one["battles"] == sub["battles"] <= board["battles"]
    missing = httpx.get(f"{url}/v1/leaderboard", params={"category": "nope"}, timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "category"

    # The schedule's test: nothing new since this leaderboard → no job; a new vote → a job.
    assert asyncio.run(schedule(arena_stack)) is None
    battle = new_battle(url)
    play(url, battle["id"], max_tokens=2)
    vote(url, battle["id"], "tie")
    queued = asyncio.run(schedule(arena_stack))
    assert queued is not None and queued.kind == "ratings"
    assert wait_for_job(url, queued.id)["status"] == "succeeded"
    assert httpx.get(f"{url}/v1/leaderboard", timeout=10).json()["battles"] == len(battles) + 1


async def schedule(stack: Stack):
    from broker.connection import connect, connect_arq
    from broker.jobs import JobStore
    from broker.keys import Keys
    from corral.runner import Runner

    settings = Settings(redis_url=stack.redis_url, key_prefix=stack.key_prefix)
    store = JobStore(
        connect(stack.redis_url), connect_arq(stack.redis_url), Keys(stack.key_prefix), "/tmp", 60
    )
    try:
        return await Runner(settings, store, stack.redis_url).schedule_ratings()
    finally:
        await store.aclose()


def wait_for_job(url: str, job_id: str, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()
        if job["status"] in ("succeeded", "failed", "aborted"):
            return job
        time.sleep(0.2)
    raise TimeoutError(job_id)
