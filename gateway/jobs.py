"""Jobs over HTTP (admins only): create, list, show, abort, and follow a job's progress as
server-sent events. What a job may name is checked here (broker/confine.py): files inside the
allowed roots, allowed endpoints, bounded counts; and each key has a quota of active jobs and
all jobs share a disk quota."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from broker.confine import NotAllowed, check_job
from broker.jobs import ENDED, KINDS, JobCreate, JobPublic
from gateway.auth import Limited, admin
from gateway.errors import APIError, InvalidRequest
from gateway.state import Gateway, GatewayDep

router = APIRouter(prefix="/v1/jobs", dependencies=[Depends(admin)])

# How long one read of a job's events waits before the stream checks the client is still there.
_EVENTS_BLOCK_MS = 5000


class JobNotFound(APIError):
    status = 404

    def __init__(self, job_id: str) -> None:
        super().__init__(f"No job '{job_id}'.", param="job_id", code="job_not_found")


class QuotaExceeded(APIError):
    status = 429
    type = "rate_limit_error"


def folder_bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and not f.is_symlink())


async def _check_quotas(gateway: Gateway, owner: str) -> None:
    settings = gateway.settings
    active = [j for j in await gateway.jobs.list(1000) if j.owner == owner and j.status not in ENDED]
    if len(active) >= settings.job_max_active_per_user:
        raise QuotaExceeded(
            f"You have {len(active)} jobs queued or running; the limit is "
            f"{settings.job_max_active_per_user}.",
            code="job_quota",
        )
    used = await asyncio.to_thread(folder_bytes, Path(gateway.jobs.artifacts_root))
    if used >= settings.job_disk_quota_gb * 2**30:
        raise QuotaExceeded(
            f"Job folders use {used / 2**30:.1f} GiB of their {settings.job_disk_quota_gb} GiB quota; "
            "delete old jobs or wait for their retention to end.",
            code="disk_quota",
        )


@router.post("")
async def create_job(body: JobCreate, gateway: GatewayDep, who: Limited) -> JobPublic:
    if body.kind not in KINDS:
        raise InvalidRequest(
            f"unknown job kind {body.kind!r}; kinds: {', '.join(sorted(KINDS))}",
            param="kind",
            code="invalid_value",
        )
    schema, _ = KINDS[body.kind]
    try:
        params = schema.model_validate(body.params)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(["params", *(str(p) for p in first["loc"])])
        raise InvalidRequest(f"{param}: {first['msg']}", param=param, code="invalid_value") from None
    try:
        params = await asyncio.to_thread(check_job, body.kind, params, gateway.settings)
    except NotAllowed as e:
        raise InvalidRequest(e.message, param=e.param, code="not_allowed") from None
    await _check_quotas(gateway, who.id)
    return await gateway.jobs.create(body.kind, params, owner=who.id)


@router.get("")
async def list_jobs(gateway: GatewayDep, limit: int = 100) -> dict[str, Any]:
    limit = max(1, min(limit, 1000))
    return {"object": "list", "data": [j.model_dump() for j in await gateway.jobs.list(limit)]}


def _found(job: JobPublic | None, job_id: str) -> JobPublic:
    if job is None:
        raise JobNotFound(job_id)
    return job


@router.get("/{job_id}")
async def get_job(job_id: str, gateway: GatewayDep) -> JobPublic:
    return _found(await gateway.jobs.get(job_id), job_id)


@router.delete("/{job_id}")
async def abort_job(job_id: str, gateway: GatewayDep) -> JobPublic:
    return _found(await gateway.jobs.abort(job_id), job_id)


@router.get("/{job_id}/events")
async def job_events(job_id: str, gateway: GatewayDep) -> StreamingResponse:
    """Every update of the job from its creation on, then each new one, until it ends."""
    _found(await gateway.jobs.get(job_id), job_id)

    async def stream() -> AsyncIterator[bytes]:
        after = "0"
        while True:
            entries = await gateway.jobs.events(job_id, after, _EVENTS_BLOCK_MS)
            for entry_id, fields in entries:
                after = entry_id
                yield b"data: " + orjson.dumps(fields) + b"\n\n"
                if fields.get("status") in ENDED:
                    yield b"data: [DONE]\n\n"
                    return
            if not entries:
                job = await gateway.jobs.get(job_id)
                if job is None or job.status in ENDED:  # expired, or ended before its events were read
                    yield b"data: [DONE]\n\n"
                    return

    return StreamingResponse(stream(), media_type="text/event-stream")
