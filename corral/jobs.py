"""`corral jobs`: run the job runner (corral/runner.py), or list, show (and follow) and cancel
jobs."""

from __future__ import annotations

import asyncio
import json
import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table

from broker.connection import resolve_redis_url
from broker.jobs import ENDED, JobPublic, JobStore, open_store
from broker.settings import Settings
from corral.progress import Counts


def add_parser(commands) -> None:
    jobs = commands.add_parser("jobs", help="run the job runner, or list, show and cancel jobs")
    actions = jobs.add_subparsers(dest="action")
    actions.add_parser("list", help="recent jobs")
    show = actions.add_parser("show", help="one job")
    show.add_argument("job_id")
    show.add_argument("-f", "--follow", action="store_true", help="a progress bar until the job ends")
    cancel = actions.add_parser("cancel", help="abort a job, and wait until it has stopped")
    cancel.add_argument("job_id")
    cancel.add_argument("--no-wait", action="store_true", help="ask it to stop, and return at once")


async def follow(store: JobStore, job_ids: list[str], console: Console) -> int:
    """Progress bars of jobs until every one has ended, then a table of how each ended; 0 when
    all succeeded."""
    columns = (TextColumn("{task.description}"), BarColumn(), Counts(), TimeElapsedColumn())
    with Progress(*columns, console=console) as bar:
        tasks = {job_id: bar.add_task(job_id, total=None) for job_id in job_ids}
        while True:
            jobs = [await store.get(job_id) for job_id in job_ids]
            for job_id, job in zip(job_ids, jobs, strict=True):
                if job is None:
                    console.print(f"[red]no job {job_id} (it may have expired)[/red]")
                    return 1
                what = f"{job.kind} {job.id[:8]} {job.status}: {job.stage or ''} {job.message}".strip()
                bar.update(tasks[job_id], description=what[:60], completed=job.done, total=job.total or None)
            if all(job.status in ENDED for job in jobs):
                break
            await asyncio.sleep(0.5)
    table = Table(Column("job", no_wrap=True), "kind", "status", "result")
    for job in jobs:
        table.add_row(job.id, job.kind, job.status, json.dumps(job.result or job.error)[:160])
    console.print(table)
    for job in jobs:
        if isinstance(job.result, dict) and job.result.get("warning"):
            console.print(f"[yellow]{job.kind} {job.id}: {job.result['warning']}[/yellow]")
    return 0 if all(job.status == "succeeded" for job in jobs) else 1


async def _cancel(store: JobStore, job: JobPublic, console: Console, wait: bool) -> int:
    """Aborts a job and (unless told not to) waits until it has stopped, saying how long it took;
    a job that has already ended is left as it is, and said so (exit 1)."""
    if job.status in ENDED:
        ended = time.strftime("%Y-%m-%d %H:%M", time.localtime(job.finished_at or job.created_at))
        console.print(f"job {job.id} already ended ({job.status}, {ended}); nothing to cancel")
        return 1
    asked = time.monotonic()
    job = await store.abort(job.id) or job
    if not wait or job.status in ENDED:
        console.print(f"job {job.id}: {job.status}" + ("" if job.status in ENDED else "; abort requested"))
        return 0
    with console.status(
        f"aborting {job.kind} job {job.id}: it stops at its next step and keeps what it finished"
    ):
        while job is not None and job.status not in ENDED:
            await asyncio.sleep(0.25)
            job = await store.get(job.id)
    if job is None:
        console.print("[red]the job's record is gone[/red]")
        return 1
    console.print(f"job {job.id} {job.status} in {time.monotonic() - asked:.1f} s: {job.message}")
    return 0


def run_cli(args, settings: Settings) -> int:
    if args.action is None:
        from corral.runner import main

        main(settings)
        return 0
    return asyncio.run(_cli(args, settings))


async def _cli(args, settings: Settings) -> int:
    store = open_store(settings, await asyncio.to_thread(resolve_redis_url, settings))
    console = Console()
    try:
        if args.action == "list":
            table = Table(Column("id", no_wrap=True), "kind", "status", "stage", "progress", "created")
            for job in await store.list():
                created = time.strftime("%m-%d %H:%M", time.localtime(job.created_at))
                done = f"{job.done}/{job.total}" if job.total else str(job.done or "")
                table.add_row(job.id, job.kind, job.status, job.stage, done, created)
            console.print(table)
            return 0
        job = await store.get(args.job_id)
        if job is None:
            console.print(f"[red]no job {args.job_id}[/red]")
            return 1
        if args.action == "show":
            if args.follow and job.status not in ENDED:
                return await follow(store, [job.id], console)
            console.print_json(job.model_dump_json())
            return 0
        return await _cancel(store, job, console, wait=not args.no_wait)
    finally:
        await store.aclose()
