"""Jobs over HTTP: create, list, show, abort, and follow a job's progress as server-sent events."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from broker.jobs import ENDED, KINDS, JobCreate, JobPublic
from gateway.auth import caller
from gateway.errors import APIError, InvalidRequest
from gateway.state import GatewayDep

router = APIRouter(prefix="/v1/jobs", dependencies=[Depends(caller)])

# How long one read of a job's events waits before the stream checks the client is still there.
_EVENTS_BLOCK_MS = 5000


class JobNotFound(APIError):
    status = 404

    def __init__(self, job_id: str) -> None:
        super().__init__(f"No job '{job_id}'.", param="job_id", code="job_not_found")


@router.post("")
async def create_job(body: JobCreate, gateway: GatewayDep) -> JobPublic:
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
    return (await gateway.jobs.create(body.kind, params)).redacted()


@router.get("")
async def list_jobs(gateway: GatewayDep, limit: int = 100) -> dict:
    return {"object": "list", "data": [j.redacted().model_dump() for j in await gateway.jobs.list(limit)]}


def _found(job: JobPublic | None, job_id: str) -> JobPublic:
    if job is None:
        raise JobNotFound(job_id)
    return job.redacted()


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
