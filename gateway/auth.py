"""API keys (bearer auth on /v1/*) and per-key limits kept in Redis, so every gateway shares them.

Keys are never stored, logged or exported: limits are kept under a short hash of the key."""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import redis.asyncio as aioredis
from fastapi import Depends, Request

from broker.keys import Keys
from broker.settings import Settings
from gateway.errors import APIError

_WINDOW_S = 60


class InvalidAPIKey(APIError):
    status = 401

    def __init__(self) -> None:
        super().__init__(
            "Incorrect or missing API key: send it as 'Authorization: Bearer KEY'.", code="invalid_api_key"
        )


class RateLimited(APIError):
    status = 429
    type = "rate_limit_error"

    def __init__(self, what: str, limit: int, retry_after_s: int) -> None:
        super().__init__(
            f"Rate limit reached: {limit} {what} per minute. Retry in {retry_after_s}s.",
            code="rate_limit_exceeded",
        )
        self.headers = {"Retry-After": str(retry_after_s)}


def load_api_keys(settings: Settings) -> frozenset[str]:
    keys = {k.strip() for k in (settings.api_keys or "").split(",") if k.strip()}
    if settings.api_key_file:
        lines = Path(settings.api_key_file).expanduser().read_text().splitlines()
        keys |= {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    return frozenset(keys)


def key_id(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()[:16]


@dataclass
class Limits:
    """Requests and tokens per minute for each caller (API key, or client address without keys),
    counted in fixed one-minute windows in Redis."""

    redis: aioredis.Redis
    keys: Keys
    api_keys: frozenset[str]
    requests_per_min: int
    tokens_per_min: int

    def authenticate(self, request: Request) -> str:
        """The caller's id for limits; raises InvalidAPIKey when keys are on and this one is wrong."""
        if not self.api_keys:
            return f"ip:{request.client.host if request.client else 'unknown'}"
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(given, k) for k in self.api_keys):
            raise InvalidAPIKey()
        return f"key:{key_id(given)}"

    def _window(self) -> tuple[int, int]:
        now = time.time()
        return int(now // _WINDOW_S), int(_WINDOW_S - now % _WINDOW_S) + 1

    async def admit(self, caller: str) -> None:
        """Count one request; raise RateLimited if the caller is over either limit."""
        if not (self.requests_per_min or self.tokens_per_min):
            return
        window, retry_after_s = self._window()
        requests_key = self.keys.rate(caller, "requests", window)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.incr(requests_key)
            pipe.expire(requests_key, _WINDOW_S * 2)
            pipe.get(self.keys.rate(caller, "tokens", window))
            requests, _, tokens = await pipe.execute()
        if self.requests_per_min and int(requests) > self.requests_per_min:
            raise RateLimited("requests", self.requests_per_min, retry_after_s)
        if self.tokens_per_min and int(tokens or 0) >= self.tokens_per_min:
            raise RateLimited("tokens", self.tokens_per_min, retry_after_s)

    async def spend(self, caller: str, tokens: int) -> None:
        if not self.tokens_per_min or tokens <= 0:
            return
        tokens_key = self.keys.rate(caller, "tokens", self._window()[0])
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.incrby(tokens_key, tokens)
            pipe.expire(tokens_key, _WINDOW_S * 2)
            await pipe.execute()


async def get_limits(request: Request) -> Limits:
    return request.app.state.limits


async def caller(request: Request, limits: Annotated[Limits, Depends(get_limits)]) -> str:
    return limits.authenticate(request)


Caller = Annotated[str, Depends(caller)]
LimitsDep = Annotated[Limits, Depends(get_limits)]
