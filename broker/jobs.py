"""Long-lived jobs (cleaning, training, judging) on arq, with their state in Redis.

arq runs them (queue `corral:jobs`, or `corral:jobs:gpu`) and retries them; it has no progress
API, so each job's state lives in a hash of ours (`Keys.job`) with a stream of its updates
(`Keys.job_events`) for live views. Job kinds and their params schemas are named here, so that
the gateway can validate a job without importing the code that runs it.
"""

from __future__ import annotations

import builtins
import json
import time
import uuid
from collections.abc import Callable
from typing import Annotated, Any, Literal

import redis.asyncio as aioredis
from arq.connections import ArqRedis
from pydantic import BaseModel, ConfigDict, Field, field_validator

from broker.connection import connect, connect_arq
from broker.keys import Keys
from broker.settings import Settings

JobStatus = Literal["queued", "running", "succeeded", "failed", "aborted"]
ENDED = ("succeeded", "failed", "aborted")
# The one arq function every job runs through (corral/runner.py dispatches on the kind).
RUN_JOB = "run_job"
_EVENTS_MAX = 1000


class JobError(Exception):
    """A job's failure whose text is safe to show whoever reads the job: a named reason and a
    message written by Corral, never quoting the job's input."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")


class JobAborted(Exception):
    """A job stopped because it was asked to (its stop event is set); what it finished is kept."""


# How a job reports progress: progress(stage, done, total, message="", **metrics).
Progress = Callable[..., None]


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
        parsed: list[dict[str, Any]] = []
        for item in steps:
            if isinstance(item, str):
                parsed.append({"name": item})
            elif isinstance(item, dict) and len(item) == 1 and "name" not in item:
                ((name, params),) = item.items()
                parsed.append({"name": name, "params": params or {}})
            else:
                parsed.append(item)
        return parsed


class RatingsParams(BaseModel):
    """Recompute the arena leaderboard from every vote so far."""

    model_config = ConfigDict(extra="forbid")
    # Bootstrap resamples behind the confidence intervals; None = the runner's setting.
    bootstrap_rounds: int | None = Field(None, ge=10, le=10000)
    seed: int = 0
    # How rows are ranked (judge.ratings.RANK_RULES): "ub", models whose intervals overlap share
    # a rank (later FastChat's "Rank (UB)"); "position", 1, 2, 3, ... by score (FastChat 0.2.36).
    rank_rule: Literal["ub", "position"] = "ub"
    # The Bradley–Terry fit (judge.ratings.RATING_SYSTEMS): "bt", FastChat 0.2.36's regularised
    # one; "bt-mle", the unregularised maximum likelihood of later FastChat.
    rating_system: Literal["bt", "bt-mle"] = "bt"
    # Clean-battle filters (judge/analytics.py): users whose votes never count (as the log names
    # them: an API key's hash, or an address), and the votes a user's day may count (0: all).
    banned_users: list[Annotated[str, Field(max_length=256)]] = Field(default_factory=list, max_length=10_000)
    daily_vote_cap: int = Field(0, ge=0, le=100_000)
    # The "long_prompt" category: a last prompt of at least this many tokens, as either model read it.
    long_prompt_tokens: int = Field(500, ge=1, le=10_000_000)


class TrainParams(BaseModel):
    """Supervised fine-tuning of a chat model on conversations (pipelines/train.py)."""

    model_config = ConfigDict(extra="forbid")
    # The base: a built-in name, a local folder or a hub id.
    model: str = "smollm2-135m-instruct"
    # ShareGPT, OpenAI `messages` or Alpaca records, JSON or JSONL (what `corral clean` writes).
    data: list[str] = Field(min_length=1)
    # Held-out conversations; without them, `eval_ratio` of `data` is held out (0 = none).
    eval_data: list[str] = Field(default_factory=list)
    eval_ratio: float = Field(0.0, ge=0, lt=1)
    method: Literal["full", "lora", "qlora"] = "full"
    lora_r: int = Field(8, gt=0)
    lora_alpha: int = Field(16, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    # Module names LoRA adapts; None = every linear layer but the output head.
    lora_target_modules: list[str] | None = None
    # LoRA output: merged into the base (a plain model folder) or the adapter alone.
    merge_lora: bool = True
    epochs: float = Field(3.0, gt=0)
    # > 0 overrides epochs.
    max_steps: int = -1
    # None = 2e-5 for full fine-tuning (FastChat's), 2e-4 for LoRA.
    learning_rate: float | None = Field(None, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    # Sequences per device step; the global batch (None = up to 128, about 16 steps an epoch)
    # is reached with gradient accumulation.
    batch_size: int = Field(2, gt=0)
    global_batch_size: int | None = Field(None, gt=0)
    max_length: int = Field(2048, gt=8)
    # A conversation longer than max_length: cut (kept if an assistant token remains) or skipped.
    too_long: Literal["truncate", "skip"] = "truncate"
    packing: bool = False
    gradient_checkpointing: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    save_steps: int = Field(100, gt=0)
    save_total_limit: int = Field(2, gt=0)
    seed: int = 42
    # A Jinja file (or template text) for a tokenizer without a chat template.
    chat_template: str | None = None


class EndpointSpec(BaseModel):
    """An OpenAI-compatible chat endpoint: this Corral's gateway (base_url None, the default) or
    another one. Its key is never part of a job: `api_key_env` names the environment variable
    of the job runner that holds it (Corral's own gateway needs none: the runner has its key)."""

    model_config = ConfigDict(extra="forbid")
    base_url: str | None = Field(None, max_length=2000)
    api_key_env: str | None = Field(None, pattern=r"^[A-Z_][A-Z0-9_]{0,63}$")
    # Extra body fields for every request; {"lane": "batch"} keeps judge traffic on Corral's
    # batch lane, behind interactive users (other endpoints: set {}). They never replace the
    # fields the judge sets (model, messages, sampling).
    extra_body: dict[str, Any] = Field(default_factory=lambda: {"lane": "batch"}, max_length=16)
    timeout_s: float = Field(600.0, gt=0, le=3600)


class AnswerParams(BaseModel):
    """Answers of `models` to a question set, written as FastChat's model_answer/MODEL.jsonl."""

    model_config = ConfigDict(extra="forbid")
    questions: str = "mt_bench"  # mt_bench, corral, or a JSONL path
    models: list[str] = Field(min_length=1, max_length=1000)
    endpoint: EndpointSpec = Field(default_factory=EndpointSpec)
    # None = CORRAL_HOME/judge/<question set>; answers there are reused, never redone.
    output: str | None = None
    n: int = Field(1, ge=1, le=8)
    max_tokens: int = Field(1024, gt=0)
    # None = MT-bench's per-category temperatures.
    temperature: float | None = Field(None, ge=0, le=2)
    concurrency: int = Field(8, ge=1, le=256)
    # Only these questions of the set: the first N, or the ones with these ids (short CPU runs).
    first_n: int | None = Field(None, ge=1)
    question_ids: list[int | str] | None = Field(None, max_length=10_000)


class JudgmentParams(BaseModel):
    """Judgments of `models`' answers by `judge`, written as FastChat's model_judgment/ files."""

    model_config = ConfigDict(extra="forbid")
    questions: str = "mt_bench"
    models: list[str] = Field(min_length=1, max_length=1000)
    judge: str
    judge_endpoint: EndpointSpec = Field(default_factory=EndpointSpec)
    mode: Literal["single", "pairwise-baseline", "pairwise-all"] = "single"
    baseline: str | None = None
    output: str | None = None
    max_tokens: int = Field(1024, gt=0)
    concurrency: int = Field(8, ge=1, le=256)
    # Further tries when a judgment cannot be parsed; then it is stored as a parse failure.
    parse_retries: int = Field(2, ge=0, le=10)
    # Verdicts as JSON enforced by response_format json_schema (the judge's server must serve
    # structured outputs, as Corral and OpenAI do), instead of a [[...]] marker in free text.
    structured: bool = False
    # Jobs (the answer job) this one waits for before it starts judging.
    wait_for: list[str] = Field(default_factory=list)
    first_n: int | None = Field(None, ge=1)
    question_ids: list[int | str] | None = Field(None, max_length=10_000)


# kind → (params schema, runs on the GPU queue)
KINDS: dict[str, tuple[type[BaseModel], bool]] = {
    "clean": (CleanParams, False),
    "ratings": (RatingsParams, False),
    "train": (TrainParams, True),
    "answer": (AnswerParams, False),
    "judgment": (JudgmentParams, False),
}


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
    # The latest figures a job reports (training: loss, learning rate, tokens/s, ETA).
    metrics: dict[str, Any] | None = None
    # `reason: message`, a named reason and a short text that never quotes the job's input.
    error: str | None = None
    artifacts: str = ""
    # Who created it (the caller's id; "cli" on the server).
    owner: str = "cli"


_JSON_FIELDS = ("params", "result", "metrics")
_NUMBERS = {
    "done": int,
    "total": int,
    "attempts": int,
    "created_at": float,
    "started_at": float,
    "finished_at": float,
}


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

    async def aclose(self) -> None:
        await self.redis.aclose()
        await self.arq.aclose()

    async def create(self, kind: str, params: BaseModel, owner: str = "cli") -> JobPublic:
        _, gpu = KINDS[kind]
        job_id = uuid.uuid4().hex[:16]
        job = JobPublic(
            id=job_id,
            kind=kind,
            status="queued",
            queue=self.keys.jobs_queue(gpu),
            owner=owner,
            params=params.model_dump(),
            created_at=time.time(),
            artifacts=f"{self.artifacts_root}/{job_id}",
        )
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
            events: dict[Any, Any] = dict(encoded)
            pipe.xadd(self.keys.job_events(job_id), events, maxlen=_EVENTS_MAX, approximate=True)
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
        return bool(await self.redis.hget(self.keys.job(job_id), "abort") == "1")

    async def events(
        self, job_id: str, after: str, block_ms: int
    ) -> builtins.list[tuple[str, dict[str, Any]]]:
        reply = await self.redis.xread({self.keys.job_events(job_id): after}, block=block_ms, count=100)
        return [entry for _, entries in reply or [] for entry in entries]


def open_store(settings: Settings, url: str) -> JobStore:
    """The job store of these settings (close it with `aclose`): on CORRAL_JOBS_REDIS_URL when
    that is set, else on the main Redis at `url`."""
    keys = Keys(settings.key_prefix)
    url = settings.jobs_redis_url or url
    return JobStore(connect(url), connect_arq(url), keys, str(settings.home / "jobs"), settings.job_keep_s)
