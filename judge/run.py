"""The `answer` and `judgment` jobs: where their files go, and the results published for the
gateway's /v1/judge/results (and so the UI). A judgment job queued with `wait_for` its answer
job is held back by the job runner until that one has succeeded."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from pathlib import Path

import redis

from broker.jobs import AnswerParams, JudgmentParams, Progress
from broker.keys import Keys
from judge import questions as question_sets
from judge.answers import generate, load_answers
from judge.judgments import judge, judgment_file
from judge.results import summarize

# A judgment's text shown when browsing results is cut here (the files keep it whole).
_BROWSE_CHARS = 4000


def output_folder(params: AnswerParams | JudgmentParams, home: Path) -> Path:
    """Where answers and judgments live: given, or CORRAL_HOME/judge/<question set>. Shared by
    every job on the same set, so answers are made once and judged by any judge."""
    if params.output:
        return Path(params.output)
    return home / "judge" / question_set_name(params.questions)


def question_set_name(questions: str) -> str:
    """A question set's name as a folder name of our own: its file's stem, in safe characters."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", Path(questions).stem).lstrip(".") or "questions"


def run_name(params: JudgmentParams) -> str:
    return f"{question_set_name(params.questions)}/{params.mode}/{params.judge}"


def _prepare(config: AnswerParams | JudgmentParams, folder: Path, home: Path) -> Path:
    """The shared output folder, and the resolved config beside the job's artifacts."""
    output = output_folder(config, home)
    output.mkdir(parents=True, exist_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(config.model_dump_json(indent=2))
    return output


def answer_job(params: dict, folder: Path, home: Path, progress: Progress, stop: threading.Event) -> dict:
    config = AnswerParams.model_validate(params)
    output = _prepare(config, folder, home)
    result = asyncio.run(generate(config, output, progress, stop))
    return {**result, "output": str(output)}


def judgment_job(
    params: dict,
    folder: Path,
    home: Path,
    client: redis.Redis,
    keys: Keys,
    progress: Progress,
    stop: threading.Event,
) -> dict:
    config = JudgmentParams.model_validate(params)
    output = _prepare(config, folder, home)
    counts = asyncio.run(judge(config, output, progress, stop))
    questions = question_sets.chosen(config)
    summary = summarize(
        output, Path(counts["file"]), "single" if config.mode == "single" else "pair", questions
    )
    summary.update(
        name=run_name(config), judge=config.judge, questions=config.questions, computed_at=time.time()
    )
    publish(client, keys, summary, _browse(config, output, questions))
    ended = {**counts, "results": str(output / "results.json"), "name": summary["name"]}
    return {**ended, "warning": summary["warning"]} if "warning" in summary else ended


def _browse(config: JudgmentParams, output: Path, questions: list) -> list[dict]:
    """Per question: its turns, each model's answer, and the judgments, for people to read."""
    models = sorted(set(config.models) | ({config.baseline} if config.baseline else set()))
    answers = {m: load_answers(output, m) for m in models}
    kind = "single" if config.mode == "single" else "pair"
    by_question: dict = {}
    for line in judgment_file(output, config.judge, kind).read_text().splitlines():
        record = json.loads(line)
        for field in ("judgment", "g1_judgment", "g2_judgment"):
            if field in record:
                record[field] = record[field][:_BROWSE_CHARS]
        for field in ("user_prompt", "g1_user_prompt", "g2_user_prompt"):
            record.pop(field, None)
        by_question.setdefault(record["question_id"], []).append(record)
    return [
        {
            "question_id": q.question_id,
            "category": q.category,
            "turns": q.turns,
            "reference": q.reference,
            "answers": {
                m: a[q.question_id]["choices"][0]["turns"] for m, a in answers.items() if q.question_id in a
            },
            "judgments": by_question.get(q.question_id, []),
        }
        for q in questions
    ]


def publish(client: redis.Redis, keys: Keys, summary: dict, browse: list[dict]) -> None:
    client.hset(keys.judge_results, summary["name"], json.dumps({**summary, "questions_detail": browse}))
