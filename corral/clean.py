"""`corral clean`: a cleaning pipeline in the foreground, with a progress bar per stage."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from broker.jobs import JobAborted
from broker.settings import Settings
from corral.progress import Counts
from pipelines.pipeline import CleanConfig, Run


def add_parser(commands) -> None:
    clean = commands.add_parser(
        "clean",
        help="clean conversation data (ShareGPT, OpenAI messages or Alpaca; .json or .jsonl)",
        description="Runs cleaning steps over conversation files into an output folder: "
        "train.jsonl (and test.jsonl), each stage's output and rejected records with reasons, "
        "report.json (records in, kept, dropped by reason, out per stage), stats.json and stats.png.",
    )
    clean.add_argument("inputs", nargs="*", help="input files (merged in order)")
    clean.add_argument("-o", "--output", help="output folder; a run there resumes (not with --queue)")
    clean.add_argument(
        "--queue", action="store_true", help="run it as a queued job (see `corral jobs`) instead of here"
    )
    clean.add_argument("--config", help="a pipeline YAML file (inputs, steps, format, test_ratio, ...)")
    clean.add_argument("--steps", help="comma-separated step names, run with default parameters")
    clean.add_argument("--format", choices=["sharegpt", "openai"], help="output format (default sharegpt)")
    clean.add_argument("--test-ratio", type=float, help="share of records held out as test.jsonl")
    clean.add_argument("--seed", type=int, help="seed for the test split and sampling")
    clean.add_argument("--tokenizer", help="model name, folder or hub id (default: the built-in model)")


def config_from(args: argparse.Namespace) -> CleanConfig:
    fields: dict = CleanConfig.from_yaml(Path(args.config)).model_dump() if args.config else {}
    if args.inputs:
        fields["inputs"] = args.inputs
    if args.steps:
        fields["steps"] = [name.strip() for name in args.steps.split(",") if name.strip()]
    for name in ("format", "test_ratio", "seed", "tokenizer"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    fields.setdefault("tokenizer", Settings().model)
    return CleanConfig.model_validate(fields)


def tokenizer_for(home: Path):
    """Resolves Corral's model names (the built-in GGUF model included) to a tokenizer."""

    def load(name: str | None):
        from transformers import AutoTokenizer

        from workers.loading import resolve_model_path

        return AutoTokenizer.from_pretrained(resolve_model_path(name or Settings().model, home))

    return load


def run_clean(args: argparse.Namespace, settings: Settings) -> int:
    console = Console()
    config = config_from(args)
    if args.queue:
        config = config.model_copy(update={"inputs": [str(Path(p).resolve()) for p in config.inputs]})
        return queue_job("clean", config, settings, console)
    if not args.output:
        console.print("[red]--output is needed (or --queue)[/red]")
        return 2
    with Progress(
        TextColumn("{task.description:<24}"), BarColumn(), Counts(), TimeElapsedColumn(), console=console
    ) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total or None)
            bar.update(tasks[stage], completed=done, total=total or None)

        run = Run(config, Path(args.output), {"tokenizer": tokenizer_for(settings.home)}, progress)
        done_before = len(run.completed())
        if done_before:
            console.print(
                f"resuming in {args.output}: {done_before} of {len(run.stage_names)} stages were "
                "finished by an earlier run of this pipeline and are kept"
            )
        try:
            reports = run.execute()
        except JobAborted:
            console.print("[yellow]stopped; run the same command again to resume[/]")
            return 130
    table = Table("stage", "in", "kept", "dropped", "added", "out")
    for r in reports:
        dropped = ", ".join(f"{reason} {n}" for reason, n in sorted(r.dropped.items())) or "0"
        table.add_row(r.stage, str(r.records_in), str(r.kept), dropped, str(r.added or ""), str(r.out))
    console.print(table)
    split = reports[-1].notes
    files = ", ".join(
        f"{name}.jsonl ({split.get(name, 0)} records)" for name in ("train", "test") if name in split
    )
    if "test" in split and not split["test"]:
        files += " — the test split is empty: too few records for --test-ratio"
    console.print(f"written to {args.output}: {files}; report.json, stats.json, stats.png")
    return 0


def queue_job(kind: str, params, settings: Settings, console: Console) -> int:
    """Enqueues a job; its files land under CORRAL_HOME/jobs/ID. Prints the id."""
    import asyncio

    from broker.connection import resolve_redis_url
    from broker.jobs import open_store

    async def enqueue():
        store = open_store(settings, await asyncio.to_thread(resolve_redis_url, settings))
        try:
            return await store.create(kind, params)
        finally:
            await store.aclose()

    job = asyncio.run(enqueue())
    console.print(f"queued job {job.id}; follow it with: corral jobs show {job.id}")
    print(job.id)
    return 0
