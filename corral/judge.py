"""`corral judge`: MT-bench-style evaluation as queued jobs (`run`), and the results and judge
agreement from the files they write (`show`, `agreement`)."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from rich.console import Console

from broker.connection import resolve_redis_url
from broker.jobs import AnswerParams, EndpointSpec, JudgmentParams
from broker.settings import Settings


def add_parser(commands) -> None:
    judge = commands.add_parser("judge", help="evaluate models with an LLM judge (MT-bench style)")
    actions = judge.add_subparsers(dest="action", required=True)
    run = actions.add_parser(
        "run",
        help="queue the answer job and the judgment job",
        description="Answers of --models to the questions, then judgments by --judge; "
        "files in FastChat's model_answer/ and model_judgment/ layout plus results.json "
        "and results.png under CORRAL_HOME/judge/<questions> (or --output).",
    )
    run.add_argument("--models", required=True, help="comma-separated contestant model names")
    run.add_argument("--judge", required=True, help="the judge model's name at --judge-url")
    run.add_argument("--mode", choices=["single", "pairwise-baseline", "pairwise-all"], default="single")
    run.add_argument("--baseline", help="the baseline model for pairwise-baseline")
    run.add_argument("--questions", default="mt_bench", help="mt_bench, corral, or a question.jsonl path")
    run.add_argument("--first-n", type=int, help="only the set's first N questions (short CPU runs)")
    run.add_argument("--question-ids", help="only these questions, comma-separated ids")
    run.add_argument("--output", help="folder for answers, judgments and results")
    run.add_argument("--url", help="contestants' OpenAI-compatible base URL (default: this gateway's /v1)")
    run.add_argument("--api-key-env", help="the job runner's environment variable holding the key for --url")
    run.add_argument("--judge-url", help="judge's OpenAI-compatible base URL (default: --url)")
    run.add_argument("--judge-api-key-env", help="the runner's variable holding --judge-url's key")
    run.add_argument("--max-tokens", type=int, default=1024, help="answer length limit")
    run.add_argument("--judge-max-tokens", type=int, default=1024, help="judgment length limit")
    run.add_argument(
        "--parse-retries",
        type=int,
        default=2,
        help="further tries of a judgment that cannot be parsed, before it is stored as a failure",
    )
    run.add_argument(
        "--structured",
        action="store_true",
        help="ask for verdicts as JSON through response_format json_schema (Corral or OpenAI judges)",
    )
    run.add_argument("--n", type=int, default=1, help="answers per question")
    run.add_argument("--concurrency", type=int, default=8, help="requests in flight per job")
    run.add_argument("--wait", action="store_true", help="follow both jobs with a progress bar")
    show = actions.add_parser("show", help="print results.json of an output folder")
    show.add_argument("folder")
    agree = actions.add_parser(
        "agreement",
        help="agreement of two pair-judgment files, or a judge and MT-bench human judgments, per turn and "
        "pooled; with one file, its human votes among themselves",
    )
    agree.add_argument("first")
    agree.add_argument("second", nargs="?")


def _endpoint(url: str | None, key_env: str | None) -> EndpointSpec:
    if url is None:  # Corral's own gateway: judge traffic on the batch lane
        return EndpointSpec(api_key_env=key_env)
    return EndpointSpec(base_url=url, api_key_env=key_env, extra_body={})


def run_cli(args: argparse.Namespace, settings: Settings) -> int:
    console = Console()
    if args.action == "show":
        summary = json.loads((Path(args.folder) / "results.json").read_text())
        console.print_json(json.dumps({k: v for k, v in summary.items() if k != "file"}))
        return 0
    if args.action == "agreement":
        from judge.answers import read_jsonl
        from judge.results import agreement

        second = read_jsonl(Path(args.second)) if args.second else None
        console.print_json(json.dumps(agreement(read_jsonl(Path(args.first)), second)))
        return 0
    return asyncio.run(_run(args, settings, console))


async def _run(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    from broker.jobs import open_store
    from corral.jobs import follow

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    contestants = _endpoint(args.url, args.api_key_env)
    judge_endpoint = _endpoint(args.judge_url or args.url, args.judge_api_key_env or args.api_key_env)
    output = str(Path(args.output).resolve()) if args.output else None
    named = args.questions in ("mt_bench", "corral")
    questions = args.questions if named else str(Path(args.questions).resolve())
    everyone = sorted(set(models) | ({args.baseline} if args.baseline else set()))
    ids = [i.strip() for i in args.question_ids.split(",") if i.strip()] if args.question_ids else None
    ids = [int(i) if i.isdigit() else i for i in ids] if ids else None
    pick = {"first_n": args.first_n, "question_ids": ids}
    answers = AnswerParams(
        questions=questions,
        models=everyone,
        endpoint=contestants,
        output=output,
        n=args.n,
        max_tokens=args.max_tokens,
        concurrency=args.concurrency,
        **pick,
    )
    problem = _questions_problem(answers)
    if problem is not None:
        console.print(f"[red]{problem}[/red]\nnothing was queued")
        return 2
    store = open_store(settings, await asyncio.to_thread(resolve_redis_url, settings))
    try:
        answer_job = await store.create("answer", answers)
        judgments = JudgmentParams(
            questions=questions,
            models=models,
            judge=args.judge,
            mode=args.mode,
            baseline=args.baseline,
            judge_endpoint=judge_endpoint,
            output=output,
            concurrency=args.concurrency,
            wait_for=[answer_job.id],
            max_tokens=args.judge_max_tokens,
            parse_retries=args.parse_retries,
            structured=args.structured,
            **pick,
        )
        judgment_job = await store.create("judgment", judgments)
        console.print(f"queued answer job {answer_job.id} and judgment job {judgment_job.id}")
        if not args.wait:
            return 0
        return await follow(store, [answer_job.id, judgment_job.id], console)
    finally:
        await store.aclose()


def _questions_problem(params: AnswerParams) -> str | None:
    """Why the questions cannot be read here, before anything is queued (None: they can)."""
    from broker.jobs import JobError
    from judge import questions as question_sets

    try:
        chosen = question_sets.chosen(params)
    except (JobError, OSError, ValueError) as e:
        return str(e)
    return None if chosen else f"the question set {params.questions} has no questions to ask"
