"""Answers of contestant models to a question set: multi-turn (turn 2 sees turn 1), per-category
temperatures, n choices, bounded concurrency, resumable, written in FastChat's
`model_answer/MODEL.jsonl` shape ({"question_id", "answer_id", "model_id", "choices": [{"index",
"turns"}], "tstamp"})."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from pathlib import Path

from broker.jobs import AnswerParams, JobAborted, Progress
from judge import questions as question_sets
from judge.endpoint import ChatClient


async def run_all(coroutines) -> None:
    """Runs them concurrently; the first failure cancels the rest and is raised as itself."""
    try:
        async with asyncio.TaskGroup() as group:
            for coroutine in coroutines:
                group.create_task(coroutine)
    except ExceptionGroup as failures:
        raise failures.exceptions[0] from None


def answer_file(output: Path, model: str) -> Path:
    return output / "model_answer" / f"{model.replace('/', '__')}.jsonl"


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_answers(output: Path, model: str) -> dict:
    """question_id → the model's answer record."""
    return {r["question_id"]: r for r in read_jsonl(answer_file(output, model))}


async def _answer(
    client: ChatClient, model: str, question: question_sets.Question, params: AnswerParams
) -> dict:
    temperature = params.temperature
    if temperature is None:
        temperature = question_sets.TEMPERATURES.get(question.category, question_sets.DEFAULT_TEMPERATURE)
    choices = []
    for index in range(params.n):
        messages: list[dict] = []
        turns = []
        for prompt in question.turns:
            messages.append({"role": "user", "content": prompt})
            (text,) = await client.chat(model, messages, temperature, params.max_tokens)
            messages.append({"role": "assistant", "content": text})
            turns.append(text)
        choices.append({"index": index, "turns": turns})
    return {
        "question_id": question.question_id,
        "answer_id": uuid.uuid4().hex,
        "model_id": model,
        "choices": choices,
        "tstamp": time.time(),
    }


async def generate(params: AnswerParams, output: Path, progress: Progress, stop: threading.Event) -> dict:
    """Answers every (model, question) not answered yet; returns counts."""
    questions = question_sets.chosen(params)
    todo = []
    for model in params.models:
        done = load_answers(output, model)
        todo += [(model, q) for q in questions if q.question_id not in done]
    total = len(params.models) * len(questions)
    finished = total - len(todo)
    progress("answer", finished, total)
    client = ChatClient(params.endpoint)
    slots = asyncio.Semaphore(params.concurrency)
    written = 0

    async def one(model: str, question: question_sets.Question) -> None:
        nonlocal finished, written
        async with slots:
            if stop.is_set():
                raise JobAborted()
            record = await _answer(client, model, question, params)
        path = answer_file(output, model)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:  # one line per answer: what is written survives a stop
            f.write(json.dumps(record) + "\n")
        finished, written = finished + 1, written + 1
        progress("answer", finished, total)

    try:
        await run_all(one(model, q) for model, q in todo)
    finally:
        await client.aclose()
    return {"answered": written, "already_answered": total - len(todo), "total": total}
