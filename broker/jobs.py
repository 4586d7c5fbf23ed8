"""Long-lived jobs (cleaning, training, judging) on arq, with their state in Redis.

arq runs them (queue `corral:jobs`, or `corral:jobs:gpu`) and retries them; it has no progress
API, so each job's state lives in a hash of ours (`Keys.job`) with a stream of its updates
(`Keys.job_events`) for live views. Job kinds and their params schemas are named here, so that
the gateway can validate a job without importing the code that runs it.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

import redis.asyncio as aioredis
from arq.connections import ArqRedis
from pydantic import BaseModel, ConfigDict, Field, field_validator

from broker.keys import Keys

JobStatus = Literal["queued", "running", "succeeded", "failed", "aborted"]
ENDED = ("succeeded", "failed", "aborted")
# The one arq function every job runs through (corral/jobs.py dispatches on the kind).
RUN_JOB = "run_job"
_EVENTS_MAX = 1000


# --------------------------------------------------------------------------- params per kind


class StepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class CleanParams(BaseModel):
    """A cleaning pipeline (pipelines/): input files, steps, output format and split."""

    model_config = ConfigDict(extra="forbid")
    inputs: list[str] = Field(min_length=1)
    steps: list[StepSpec] = Field(default_factory=list)
    format: Literal["sharegpt", "openai"] = "sharegpt"
    # Held out for evaluation, drawn per record with `seed`; 0 = no test split.
    test_ratio: float = Field(0.0, ge=0, lt=1)
    seed: int = 0
    # The tokenizer for split_long and the statistics (a folder, hub id or Corral model name).
    tokenizer: str | None = None

    @field_validator("steps", mode="before")
    @classmethod
    def _names_or_mappings(cls, steps: Any) -> Any:
        """`- dedupe` and `- min_turns: {turns: 4}` both name a step."""
        if not isinstance(steps, list):
            return steps
        parsed = []
        for item in steps:
            if isinstance(item, str):
                parsed.append({"name": item})
            elif isinstance(item, dict) and len(item) == 1 and "name" not in item:
                (name, params), = item.items()  # fmt: skip
                parsed.append({"name": name, "params": params or {}})
            else:
                parsed.append(item)
        return parsed


# kind → (params schema, runs on the GPU queue)
KINDS: dict[str, tuple[type[BaseModel], bool]] = {"clean": (CleanParams, False)}


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str
    params: dict[str, Any] = Field(default_factory=dict)


class JobPublic(BaseModel):
    id: str
    kind: str
    status: JobStatus
    queue: str
    params: dict[str, Any]
    stage: str = ""
    done: int = 0
    total: int = 0
    message: str = ""
    attempts: int = 0
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    artifacts: str = ""


_JSON_FIELDS = ("params", "result")
_NUMBERS = {"done": int, "total": int, "attempts": int, "created_at": float, "started_at": float,
            "finished_at": float}  # fmt: skip


def _to_hash(fields: dict[str, Any]) -> dict[str, str]:
    return {k: json.dumps(v) if k in _JSON_FIELDS else str(v) for k, v in fields.items() if v is not None}


def _from_hash(fields: dict[str, str]) -> JobPublic:
    data: dict[str, Any] = {}
    for k, v in fields.items():
        if k in _JSON_FIELDS:
            data[k] = json.loads(v)
        elif k in _NUMBERS:
            data[k] = _NUMBERS[k](v)
        else:
            data[k] = v
    return JobPublic.model_validate(data)


class JobStore:
    """Jobs in Redis: create (and enqueue on arq), read, update with events, ask to abort."""

    def __init__(
        self, redis: aioredis.Redis, arq: ArqRedis, keys: Keys, artifacts_root: str, keep_s: int
    ) -> None:
        self.redis = redis
        self.arq = arq
        self.keys = keys
        self.artifacts_root = artifacts_root
        self.keep_s = keep_s

    async def create(self, kind: str, params: BaseModel) -> JobPublic:
        _, gpu = KINDS[kind]
        job_id = uuid.uuid4().hex[:16]
        job = JobPublic(
            id=job_id, kind=kind, status="queued", queue=self.keys.jobs_queue(gpu),
            params=params.model_dump(), created_at=time.time(), artifacts=f"{self.artifacts_root}/{job_id}",
        )  # fmt: skip
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.job(job_id), mapping=_to_hash(job.model_dump()))
            pipe.zadd(self.keys.jobs_index, {job_id: int(job.created_at * 1000)})
            pipe.xadd(self.keys.job_events(job_id), {"status": "queued"}, maxlen=_EVENTS_MAX)
            await pipe.execute()
        await self.arq.enqueue_job(RUN_JOB, job_id, _job_id=job_id, _queue_name=job.queue)
        return job

    async def get(self, job_id: str) -> JobPublic | None:
        fields = await self.redis.hgetall(self.keys.job(job_id))
        return _from_hash(fields) if fields else None

    async def list(self, limit: int = 100) -> list[JobPublic]:
        ids = await self.redis.zrevrange(self.keys.jobs_index, 0, limit - 1)
        async with self.redis.pipeline(transaction=False) as pipe:  # one round trip, not one a job
            for job_id in ids:
                pipe.hgetall(self.keys.job(job_id))
            hashes = await pipe.execute()
        jobs = [_from_hash(fields) for fields in hashes if fields]
        gone = [job_id for job_id, fields in zip(ids, hashes, strict=True) if not fields]
        if gone:
            await self.redis.zrem(self.keys.jobs_index, *gone)
        return jobs

    async def update(self, job_id: str, **fields: Any) -> None:
        """Sets fields and appends them to the job's events; an ending status starts its TTL."""
        encoded = _to_hash(fields)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.job(job_id), mapping=encoded)
            pipe.xadd(self.keys.job_events(job_id), encoded, maxlen=_EVENTS_MAX, approximate=True)
            if fields.get("status") in ENDED:
                pipe.expire(self.keys.job(job_id), self.keep_s)
                pipe.expire(self.keys.job_events(job_id), self.keep_s)
            await pipe.execute()

    async def abort(self, job_id: str) -> JobPublic | None:
        """Asks a job to stop: a queued one ends at once (its runner will skip it), a running
        one at its runner's next look at the flag (within a second)."""
        job = await self.get(job_id)
        if job is None or job.status in ENDED:
            return job
        await self.redis.hset(self.keys.job(job_id), "abort", "1")
        if job.status == "queued":
            await self.update(
                job_id, status="aborted", finished_at=time.time(), message="aborted before it started"
            )
        return await self.get(job_id)

    async def abort_requested(self, job_id: str) -> bool:
        return await self.redis.hget(self.keys.job(job_id), "abort") == "1"

    async def events(self, job_id: str, after: str, block_ms: int) -> list[tuple[str, dict[str, str]]]:
        reply = await self.redis.xread({self.keys.job_events(job_id): after}, block=block_ms, count=100)
        return [entry for _, entries in reply or [] for entry in entries]
