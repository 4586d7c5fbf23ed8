"""Judgments of answers by a judge model: single grading (1–10) or pairwise comparison (against a
baseline, or all pairs), reference-guided where the category needs it, for turn 1 and turn 2.
Pairs are judged in both orders and an inconsistent pair is a tie. A judgment the judge's text
does not yield is retried a bounded number of times, then stored as a parse failure with the raw
text, never as a score.

Files follow FastChat's `model_judgment/` layout: JUDGE_single.jsonl records carry `score`,
JUDGE_pair.jsonl records `g1_winner` and `g2_winner` (in terms of model_1 and model_2); Corral
adds `winner` (the combined outcome), `parse_failure` and `attempts`. Work already in the file
is never redone.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from broker.jobs import JobAborted, JudgmentParams, Progress
from judge import prompts, verdicts
from judge import questions as question_sets
from judge.answers import load_answers, read_jsonl, run_all
from judge.endpoint import ChatClient


def judgment_file(output: Path, judge: str, kind: str) -> Path:
    return output / "model_judgment" / f"{judge.replace('/', '__')}_{kind}.jsonl"


def pairs(params: JudgmentParams) -> list[tuple[str, str]]:
    if params.mode == "pairwise-all":
        return list(itertools.combinations(params.models, 2))
    if not params.baseline:
        raise ValueError("pairwise-baseline needs `baseline`")
    return [(m, params.baseline) for m in params.models if m != params.baseline]


def _turns(record: dict) -> list[str]:
    return record["choices"][0]["turns"]


class _Judge:
    """Asks the judge, parsing strictly, retrying on a parse failure."""

    def __init__(self, client: ChatClient, params: JudgmentParams) -> None:
        self.client, self.params = client, params

    def prompt(self, kind: str, turn: int, reference: bool) -> tuple[prompts.Prompt, Callable[[str], Any]]:
        """The prompt for this judgment, and the parser of its verdict."""
        prompt = prompts.pick(kind, turn, reference)
        if self.params.structured:
            return prompts.structured(
                prompt
            ), verdicts.rating_json if kind == "single" else verdicts.verdict_json
        return prompt, verdicts.rating if kind == "single" else verdicts.verdict

    async def ask(self, prompt: prompts.Prompt, user: str, parse) -> tuple[object, str, str | None, int]:
        """(parsed value or None, the last raw text, the failure's reason or None, attempts)."""
        messages = [{"role": "system", "content": prompt.system}, {"role": "user", "content": user}]
        shape = prompts.response_format(prompt.kind) if self.params.structured else None
        failure, text = None, ""
        for attempt in range(1, self.params.parse_retries + 2):
            # The first try is greedy; retries sample, or they would repeat the same text.
            temperature = 0.0 if attempt == 1 else 0.7
            (text,) = await self.client.chat(
                self.params.judge, messages, temperature, self.params.max_tokens, response_format=shape
            )
            try:
                return parse(text), text, None, attempt
            except verdicts.ParseFailure as e:
                failure = e.reason
        return None, text, failure, self.params.parse_retries + 1


def _answers(output: Path, models: list[str]) -> dict[str, dict]:
    found = {m: load_answers(output, m) for m in models}
    missing = [m for m, answers in found.items() if not answers]
    if missing:
        raise FileNotFoundError(f"no answers for {', '.join(missing)} in {output}; run the answer job first")
    return found


async def judge(params: JudgmentParams, output: Path, progress: Progress, stop: threading.Event) -> dict:
    questions = question_sets.chosen(params)
    single = params.mode == "single"
    models = params.models if single else sorted({m for pair in pairs(params) for m in pair})
    answers = _answers(output, models)
    path = judgment_file(output, params.judge, "single" if single else "pair")
    path.parent.mkdir(parents=True, exist_ok=True)
    done = {_key(r) for r in read_jsonl(path)}
    units = [(m,) for m in params.models] if single else pairs(params)
    todo = [
        (unit, q, turn)
        for unit in units
        for q in questions
        for turn in range(1, len(q.turns) + 1)
        if all(q.question_id in answers[m] for m in unit) and _unit_key(unit, q.question_id, turn) not in done
    ]
    total, finished = len(todo) + len(done), len(done)
    progress("judge", finished, total)
    client = ChatClient(params.judge_endpoint)
    asker = _Judge(client, params)
    slots = asyncio.Semaphore(params.concurrency)
    failures = 0

    async def one(unit: tuple, question: question_sets.Question, turn: int) -> None:
        nonlocal finished, failures
        async with slots:
            if stop.is_set():
                raise JobAborted()
            if single:
                record = await _single(asker, unit[0], question, turn, answers)
            else:
                record = await _pair(asker, unit, question, turn, answers)
        failures += bool(record.get("parse_failure"))
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        finished += 1
        progress("judge", finished, total)

    try:
        await run_all(one(*item) for item in todo)
    finally:
        await client.aclose()
    return {"judged": len(todo), "already_judged": len(done), "parse_failures": failures, "file": str(path)}


def _key(record: dict) -> tuple:
    if "model" in record:
        return (record["model"],), record["question_id"], record["turn"]
    return (record["model_1"], record["model_2"]), record["question_id"], record["turn"]


def _unit_key(unit: tuple, question_id, turn: int) -> tuple:
    return tuple(unit), question_id, turn


async def _single(asker: _Judge, model: str, question, turn: int, answers: dict) -> dict:
    prompt, parse = asker.prompt("single", turn, question.needs_reference)
    answer = _turns(answers[model][question.question_id])[:turn]
    user = prompts.render(prompt, question.turns[:turn], {"": answer}, question.reference)
    score, text, failure, attempts = await asker.ask(prompt, user, parse)
    return {
        "question_id": question.question_id,
        "model": model,
        "judge": [asker.params.judge, prompt.versioned_name],
        "user_prompt": user,
        "judgment": text,
        "score": score,
        "turn": turn,
        "tstamp": time.time(),
        "parse_failure": failure,
        "attempts": attempts,
    }


async def _pair(asker: _Judge, unit: tuple, question, turn: int, answers: dict) -> dict:
    model_1, model_2 = unit
    prompt, parse = asker.prompt("pair", turn, question.needs_reference)
    turns_1 = _turns(answers[model_1][question.question_id])[:turn]
    turns_2 = _turns(answers[model_2][question.question_id])[:turn]
    games = []
    for a, b in ((turns_1, turns_2), (turns_2, turns_1)):  # game 2: the answers swapped
        user = prompts.render(prompt, question.turns[:turn], {"a": a, "b": b}, question.reference)
        games.append((user, *await asker.ask(prompt, user, parse)))
    (u1, v1, t1, f1, n1), (u2, v2, t2, f2, n2) = games
    as_models = {"A": "model_1", "B": "model_2", "tie": "tie"}
    g1 = as_models[v1] if v1 else None
    g2 = as_models[{"A": "B", "B": "A", "tie": "tie"}[v2]] if v2 else None
    winner = as_models[verdicts.combine(v1, v2)] if v1 and v2 else None
    return {
        "question_id": question.question_id,
        "model_1": model_1,
        "model_2": model_2,
        "g1_winner": g1,
        "g2_winner": g2,
        "winner": winner,
        "judge": [asker.params.judge, prompt.versioned_name],
        "g1_user_prompt": u1,
        "g1_judgment": t1,
        "g2_user_prompt": u2,
        "g2_judgment": t2,
        "turn": turn,
        "tstamp": time.time(),
        "parse_failure": f1 or f2,
        "attempts": n1 + n2,
    }
