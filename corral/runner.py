"""The job runner (`corral jobs`): arq workers on the CPU and GPU job queues. The CLI that lists,
shows, follows and cancels jobs is corral/jobs.py.

Every job goes through `run_job`, which runs the kind's function in a child process of its own
and keeps the job's hash current. A process, not a thread: an abort, or the runner's SIGTERM,
can then always end the job (a thread stuck in a C call can be neither interrupted nor killed),
and a job that hogs its interpreter cannot stall the other queue's jobs or the runner's leases.

Two facts about arq shape the rest: arq marks a job taken with an `in-progress` key that
lives as long as the job's timeout (days, for training), so a runner that dies would hold its
job that long; and arq has no progress API. So while a job runs its runner renews that key for
a short lease (`job_lease_s`): if the runner dies the lease lapses within seconds and a live
runner takes the job again, and the job resumes from its last completed stage (each kind keeps
its stages in its artifacts folder). The same renewal loop looks at the job's abort flag.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from arq.constants import in_progress_key_prefix
from arq.cron import cron
from arq.worker import Retry, Worker, func
from pydantic import ValidationError

from broker.connection import (
    connect_arq,
    connect_sync,
    job_deserializer,
    job_serializer,
    redact,
    resolve_redis_url,
)
from broker.jobs import RUN_JOB, JobAborted, JobError, JobPublic, JobStore, RatingsParams, open_store
from broker.keys import Keys
from broker.settings import Settings

log = logging.getLogger(__name__)

# A job whose dependencies have not finished goes back on the queue for this long.
_DEPENDENCY_POLL_S = 2
# Progress is written at most this often (and on every stage change).
_PROGRESS_EVERY_S = 0.5
# arq's own limits, left wide: Corral's lease and attempt count govern instead.
_ARQ_TIMEOUT_S = 30 * 24 * 3600
_ARQ_MAX_TRIES = 1000
# A job's process that ignores SIGTERM this long is killed.
_TERM_GRACE_S = 5
# How often the runner deletes the folders of jobs whose records have expired.
_SWEEP_EVERY_S = 3600


class _Failed(Exception):
    """The job was ended as failed before it ran; nothing more to do."""


def job_error(error: BaseException) -> str:
    """What a failed job shows: a named reason and a short message. Exception texts are not
    shown (a pydantic error quotes the input, an OS error names the path and tells whether it
    exists); the runner's log has them whole."""
    from judge.endpoint import EndpointError

    if isinstance(error, JobError | EndpointError):
        return str(error) if isinstance(error, JobError) else f"endpoint_error: {error}"
    if isinstance(error, ValidationError):
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "params"
        return f"invalid_params: {where}: {first['msg']}"
    if isinstance(error, OSError):
        return "file_error: a file or folder the job names cannot be read or written"
    return f"internal_error: the job failed ({type(error).__name__}); the runner's log has the details"


def job_functions(settings: Settings, url: str) -> dict[str, Callable[..., dict]]:
    """kind → blocking function (params, folder, progress, stop) → result summary."""
    from corral.clean import tokenizer_for
    from judge.leaderboard import ratings_job
    from pipelines.pipeline import clean_job

    keys = Keys(settings.key_prefix)

    def clean(params, folder, progress, stop):
        return clean_job(params, folder, {"tokenizer": tokenizer_for(settings.home)}, progress, stop)

    def ratings(params, folder, progress, stop):
        with connect_sync(url) as client:
            rounds = settings.ratings_bootstrap_rounds
            return ratings_job(params, folder, client, keys, rounds, progress, stop)

    def train(params, folder, progress, stop):
        from pipelines.train import train_job

        def model_path(name: str) -> str:
            from workers.loading import resolve_model_path

            return resolve_model_path(name, settings.home)

        return train_job(params, folder, {"model_path": model_path}, progress, stop)

    def answer(params, folder, progress, stop):
        from judge.run import answer_job

        return answer_job(params, folder, settings.home, progress, stop)

    def judgment(params, folder, progress, stop):
        from judge.run import judgment_job

        with connect_sync(url) as client:
            return judgment_job(params, folder, settings.home, client, keys, progress, stop)

    return {"clean": clean, "ratings": ratings, "train": train, "answer": answer, "judgment": judgment}


class Runner:
    """What `run_job` needs, built once per runner process."""

    def __init__(self, settings: Settings, store: JobStore, url: str) -> None:
        self.settings = settings
        self.store = store
        self.url = url

    async def schedule_ratings(self, ctx: dict | None = None) -> JobPublic | None:
        """Queues a ratings job when votes came in since the leaderboard was last computed."""
        from judge.leaderboard import votes_since_leaderboard

        def stale() -> bool:
            with connect_sync(self.url) as client:
                return votes_since_leaderboard(client, self.store.keys)

        if not await asyncio.to_thread(stale):
            return None
        job = await self.store.create("ratings", RatingsParams())
        log.info("queued ratings job %s (new votes)", job.id)
        return job

    async def run_job(self, ctx: dict, job_id: str) -> None:
        store = self.store
        job = await store.get(job_id)
        if job is None or job.status in ("succeeded", "failed", "aborted"):
            return  # expired, or aborted while queued
        try:
            ready = await self._dependencies_done(job)
        except _Failed:
            return
        if not ready:
            # Not now: back on the queue without holding this runner (a job that blocked its slot
            # waiting could wait forever for a job queued behind it). arq counts the try; the
            # job's own count of waits takes it back out of the attempts.
            await store.redis.hincrby(store.keys.job(job_id), "waits", 1)
            raise Retry(defer=_DEPENDENCY_POLL_S)
        waits = int(await store.redis.hget(store.keys.job(job_id), "waits") or 0)
        attempt = ctx["job_try"] - waits
        if attempt > self.settings.job_max_attempts:
            await store.update(
                job_id,
                status="failed",
                finished_at=time.time(),
                error=f"its runner died {attempt - 1} times; giving up",
            )
            return
        resumed = " (resumed after its runner died)" if attempt > 1 else ""
        await store.update(
            job_id, status="running", started_at=time.time(), attempts=attempt, message=f"started{resumed}"
        )
        log.info("job %s (%s) attempt %d", job_id, job.kind, attempt)
        stop = threading.Event()
        lease = asyncio.create_task(self._hold(job_id, stop))
        try:
            progress = _Progress(store, job_id)
            result = await self._run_in_child(job, progress, stop)
            await progress.flush()
            await store.update(
                job_id, status="succeeded", finished_at=time.time(), result=result, message="done"
            )
        except JobAborted:
            await store.update(
                job_id,
                status="aborted",
                finished_at=time.time(),
                message="aborted; completed stages are kept",
            )
        except JobError as e:  # a job's failure is its own, never the runner's
            await store.update(job_id, status="failed", finished_at=time.time(), error=str(e))
        finally:
            stop.set()
            lease.cancel()

    async def _run_in_child(self, job: JobPublic, progress: _Progress, stop: threading.Event) -> dict:
        """Runs the job's function in a spawned process; its progress comes back over a pipe.
        `stop` (an abort) asks the process to stop, then terminates it after `job_stop_grace_s`."""
        spawn = multiprocessing.get_context("spawn")
        receiver, sender = spawn.Pipe(duplex=False)
        stop_child = spawn.Event()
        process = spawn.Process(
            target=_child_main,
            name=f"corral-job-{job.id}",
            args=(job.kind, job.params, job.artifacts, self.settings, self.url, sender, stop_child),
        )
        process.start()
        sender.close()
        stop_at = None
        try:
            while True:
                if stop.is_set() and stop_at is None:
                    stop_child.set()
                    stop_at = time.monotonic()
                if stop_at is not None and time.monotonic() - stop_at > self.settings.job_stop_grace_s:
                    raise JobAborted()
                if not await asyncio.to_thread(receiver.poll, 0.25):
                    if not process.is_alive() and not receiver.poll():
                        raise JobError("internal_error", f"the job's process exited ({process.exitcode})")
                    continue
                try:
                    what, value = receiver.recv()
                except EOFError:
                    continue  # the process ended; the next turn says how
                if what == "progress":
                    await progress.report(*value)
                elif what == "result":
                    return value
                elif what == "aborted":
                    raise JobAborted()
                else:
                    raise JobError(*value.split(": ", 1))
        finally:
            await asyncio.to_thread(_end, process)
            receiver.close()

    async def _dependencies_done(self, job: JobPublic) -> bool:
        """Whether the jobs this one waits for (`wait_for` in its params) have succeeded; fails
        the job if one of them ended otherwise, or is gone."""
        for other_id in job.params.get("wait_for") or []:
            other = await self.store.get(other_id)
            if other is not None and other.status == "succeeded":
                continue
            if other is None or other.status in ("failed", "aborted"):
                why = "does not exist (or expired)" if other is None else f"ended {other.status}"
                await self.store.update(
                    job.id,
                    status="failed",
                    finished_at=time.time(),
                    error=f"job {other_id}, which this one waits for, {why}",
                )
                raise _Failed()
            await self.store.update(job.id, message=f"waiting for job {other_id} ({other.status})")
            return False
        return True

    async def _hold(self, job_id: str, stop: threading.Event) -> None:
        """Renews the job's lease (arq's in-progress key) and passes an abort on to the job."""
        key = in_progress_key_prefix + job_id
        lease_ms = int(self.settings.job_lease_s * 1000)
        while not stop.is_set():
            await self.store.arq.pexpire(key, lease_ms)
            if await self.store.abort_requested(job_id):
                stop.set()
            await asyncio.sleep(min(self.settings.job_lease_s / 3, 1.0))


def _end(process: multiprocessing.process.BaseProcess) -> None:
    """Waits briefly for a job's process, then terminates it, then kills it."""
    process.join(_TERM_GRACE_S if process.is_alive() else 0)
    if process.is_alive():
        process.terminate()
        process.join(_TERM_GRACE_S)
    if process.is_alive():
        process.kill()
        process.join()


def _die_with(parent_pid: int) -> None:
    """Ends this job process when its runner is gone (even SIGKILLed): a live runner takes the
    job again and resumes it, and two processes must never write one job's folder."""
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(1)


def _logging() -> None:
    """INFO for Corral's own lines; not one line per HTTP call (an answer job makes thousands)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _child_main(kind: str, params: dict, folder: str, settings: Settings, url: str, sender, stop) -> None:
    """A job's process: runs the kind's function, sending progress and then its outcome."""
    _logging()
    threading.Thread(target=_die_with, args=(os.getppid(),), daemon=True).start()

    def progress(
        stage: str, done: int, total: int, message: str | None = None, metrics: dict | None = None
    ) -> None:
        sender.send(("progress", (stage, done, total, message, metrics)))

    try:
        result = job_functions(settings, url)[kind](params, Path(folder), progress, stop)
        sender.send(("result", result))
    except JobAborted:
        sender.send(("aborted", None))
    except Exception as e:  # a job's failure is its own: logged whole here, shown by its reason
        log.exception("job in %s failed", folder)
        sender.send(("failed", job_error(e)))
    finally:
        sender.close()


class _Progress:
    """A job's progress: keeps the latest figures and writes them to the job's hash at most
    every half second and on each new stage."""

    def __init__(self, store: JobStore, job_id: str) -> None:
        self.store, self.job_id = store, job_id
        self.latest: dict[str, Any] = {}
        self.written_at = 0.0
        self.stage = ""

    async def report(
        self, stage: str, done: int, total: int, message: str | None = None, metrics: dict | None = None
    ) -> None:
        message = message or (f"{stage}: {done}/{total}" if total else f"{stage}: {done}" if done else stage)
        self.latest = {"stage": stage, "done": done, "total": total, "message": message, "metrics": metrics}
        if stage != self.stage or time.monotonic() - self.written_at >= _PROGRESS_EVERY_S:
            self.stage, self.written_at = stage, time.monotonic()
            await self.store.update(self.job_id, **self.latest)

    async def flush(self) -> None:
        if self.latest:
            await self.store.update(self.job_id, **self.latest)


async def sweep_job_folders(store: JobStore, keep_s: float) -> int:
    """Deletes the folders of jobs whose records are gone (they expire `job_keep_s` after the
    job ended) or that ended more than `keep_s` ago; returns how many."""
    root = Path(store.artifacts_root)
    removed = 0
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if not folder.is_dir() or folder.is_symlink():
            continue
        job = await store.get(folder.name)
        young = time.time() - folder.stat().st_mtime < keep_s
        ended_long_ago = job is not None and job.finished_at and time.time() - job.finished_at > keep_s
        if (job is None and not young) or ended_long_ago:
            await asyncio.to_thread(shutil.rmtree, folder, True)
            removed += 1
    return removed


async def run_runner(settings: Settings, queues: list[str] | None = None, burst: bool = False) -> None:
    url = await asyncio.to_thread(resolve_redis_url, settings)
    store = open_store(settings, url)
    runner = Runner(settings, store, url)
    keys = store.keys
    queues = queues or [keys.jobs_queue(gpu=False), keys.jobs_queue(gpu=True)]

    async def run_job(ctx: dict, job_id: str) -> None:
        await runner.run_job(ctx, job_id)

    async def schedule_ratings(ctx: dict) -> None:
        await runner.schedule_ratings(ctx)

    async def sweep() -> None:
        while True:
            removed = await sweep_job_folders(store, settings.job_keep_s)
            if removed:
                log.info("deleted %d expired job folders", removed)
            await asyncio.sleep(_SWEEP_EVERY_S)

    # The leaderboard's schedule, on the CPU queue's worker only. arq gives each run a job id of
    # the cron's name and time, so of several runners exactly one queues it.
    every = settings.ratings_every_min
    minutes = set(range(0, 60, every)) if every else set()
    schedule = [cron(schedule_ratings, name="schedule_ratings", minute=minutes)] if every else []

    workers = [
        Worker(
            [func(run_job, name=RUN_JOB)],
            queue_name=queue,
            redis_pool=connect_arq(settings.jobs_redis_url or url),
            job_serializer=job_serializer,
            job_deserializer=job_deserializer,
            job_timeout=_ARQ_TIMEOUT_S,
            max_tries=_ARQ_MAX_TRIES,
            keep_result=0,
            poll_delay=0.2,
            burst=burst,
            handle_signals=False,
            max_jobs=1,
            cron_jobs=schedule if queue == keys.jobs_queue(gpu=False) else None,
        )
        for queue in queues
    ]
    log.info("job runner on %s (redis %s)", ", ".join(queues), redact(url))
    sweeper = asyncio.create_task(sweep())
    try:
        await asyncio.gather(*(w.async_run() for w in workers))
    finally:
        sweeper.cancel()
        for w in workers:
            await w.close()
        await store.aclose()


def main(settings: Settings) -> None:
    import signal

    _logging()

    async def serve() -> None:
        task = asyncio.create_task(run_runner(settings))
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            log.info("job runner stopped")

    asyncio.run(serve())


# --------------------------------------------------------------------------- CLI: list, show, cancel
