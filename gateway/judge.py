"""Judge results over HTTP: the runs that judgment jobs published, for the UI and for scripts."""

from __future__ import annotations

from typing import Any, cast

import orjson
from fastapi import APIRouter, Depends

from gateway.auth import caller
from gateway.errors import APIError
from gateway.state import GatewayDep

router = APIRouter(prefix="/v1/judge", dependencies=[Depends(caller)])


class RunNotFound(APIError):
    status = 404

    def __init__(self, name: str) -> None:
        super().__init__(f"No judge results named '{name}'.", param="name", code="results_not_found")


@router.get("/results")
async def list_results(gateway: GatewayDep) -> dict[str, Any]:
    """Every published run's summary (per-model rows), without the per-question detail."""
    runs = await gateway.redis.hgetall(gateway.keys.judge_results)
    data = []
    for name in sorted(runs):
        summary = orjson.loads(runs[name])
        summary.pop("questions_detail", None)
        data.append(summary)
    return {"object": "list", "data": data}


@router.get("/results/{name:path}")
async def get_results(name: str, gateway: GatewayDep) -> dict[str, Any]:
    """One run: the summary and, per question, its turns, each model's answers and the judgments."""
    stored = await gateway.redis.hget(gateway.keys.judge_results, name)
    if stored is None:
        raise RunNotFound(name)
    return cast(dict[str, Any], orjson.loads(stored))
