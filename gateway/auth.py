"""API keys with roles (bearer auth on /v1/*) and per-key limits kept in Redis, so every gateway
shares them.

A caller is a `Principal`: an id (a short hash of its key, or its address when no keys are set)
and a role. Users chat, play and vote in their own battles; admins also run jobs, export the
arena and refresh the leaderboard. Keys are never stored, logged or exported."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, cast

import redis.asyncio as aioredis
from fastapi import Depends, Request

from broker.connection import atomically
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


Role = Literal["user", "admin"]


class AdminOnly(APIError):
    status = 403
    type = "permission_error"

    def __init__(self) -> None:
        super().__init__("This needs an admin key (CORRAL_ADMIN_KEYS).", code="admin_only")


@dataclass(frozen=True)
class Principal:
    """Who is calling: `id` names them in limits and records (never the key itself)."""

    id: str
    role: Role

    @property
    def admin(self) -> bool:
        return self.role == "admin"


def load_api_keys(settings: Settings) -> dict[bytes, Role]:
    """Every accepted key (as bytes, so any header value compares safely) and its role."""
    keys: dict[bytes, Role] = {}

    def add(key: str, role: Role) -> None:
        if key.strip():
            keys[key.strip().encode()] = role

    for key in (settings.api_keys or "").split(","):
        add(key, "user")
    if settings.api_key_file:
        for line in Path(settings.api_key_file).expanduser().read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                key, _, role = line.strip().partition(" ")
                if role.strip() not in ("", "user", "admin"):
                    raise ValueError(f"{settings.api_key_file}: a key's role is user or admin")
                add(key, "admin" if role.strip() == "admin" else "user")
    for key in (settings.admin_keys or "").split(","):
        add(key, "admin")
    if keys and settings.internal_key is not None:
        add(settings.internal_key.get_secret_value(), "user")
    return keys


def key_id(api_key: bytes | str) -> str:
    raw = api_key.encode() if isinstance(api_key, str) else api_key
    return hashlib.sha256(raw).hexdigest()[:16]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(settings: Settings, keys: dict[bytes, Role]) -> None:
    """Refuses to serve a non-loopback address with no keys unless told `insecure`, as Redis's
    protected mode and Jupyter do: anyone who could reach it would be an admin otherwise."""
    if not keys and not is_loopback(settings.host) and not settings.insecure:
        raise SystemExit(
            f"refusing to serve {settings.host} without API keys: set CORRAL_API_KEYS and "
            "CORRAL_ADMIN_KEYS, or pass --insecure (every caller is then a user, nobody an admin)"
        )


@dataclass
class Limits:
    """Requests and tokens per minute for each caller (API key, or client address without keys),
    counted in fixed one-minute windows in Redis."""

    redis: aioredis.Redis
    keys: Keys
    api_keys: dict[bytes, Role]
    requests_per_min: int
    tokens_per_min: int
    # No keys: callers are admins on a loopback-only gateway, users on an `insecure` one.
    keyless_role: Role = "admin"
    # The length of the fixed windows the limits count in.
    window_s: int = _WINDOW_S

    def authenticate(self, request: Request) -> Principal:
        """The caller; raises InvalidAPIKey when keys are on and this one is wrong."""
        if not self.api_keys:
            return Principal(f"ip:{request.client.host if request.client else 'unknown'}", self.keyless_role)
        # Header values arrive as latin-1 text: compare their bytes, so no key is un-comparable.
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        raw = given.encode("latin-1", "replace")
        role = None
        for key, key_role in self.api_keys.items():
            if hmac.compare_digest(raw, key):
                role = key_role
        if scheme.lower() != "bearer" or role is None:
            raise InvalidAPIKey()
        return Principal(f"key:{key_id(raw)}", role)

    def _window(self) -> tuple[int, int]:
        now = time.time()
        return int(now // self.window_s), int(self.window_s - now % self.window_s) + 1

    async def admit(self, caller: str) -> None:
        """Count one request; raise RateLimited if the caller is over either limit."""
        if not (self.requests_per_min or self.tokens_per_min):
            return
        window, retry_after_s = self._window()
        requests_key = self.keys.rate(caller, "requests", window)
        requests, _, tokens = await atomically(
            self.redis,
            ("INCR", requests_key),
            ("EXPIRE", requests_key, self.window_s * 2),
            ("GET", self.keys.rate(caller, "tokens", window)),
        )
        if self.requests_per_min and int(requests) > self.requests_per_min:
            raise RateLimited("requests", self.requests_per_min, retry_after_s)
        if self.tokens_per_min and int(tokens or 0) >= self.tokens_per_min:
            raise RateLimited("tokens", self.tokens_per_min, retry_after_s)

    async def spend(self, caller: str, tokens: int) -> None:
        if not self.tokens_per_min or tokens <= 0:
            return
        tokens_key = self.keys.rate(caller, "tokens", self._window()[0])
        await atomically(
            self.redis, ("INCRBY", tokens_key, tokens), ("EXPIRE", tokens_key, self.window_s * 2)
        )


async def get_limits(request: Request) -> Limits:
    return cast(Limits, request.app.state.limits)


async def caller(request: Request, limits: Annotated[Limits, Depends(get_limits)]) -> Principal:
    return limits.authenticate(request)


async def admin(who: Annotated[Principal, Depends(caller)]) -> Principal:
    if not who.admin:
        raise AdminOnly()
    return who


async def limited(
    who: Annotated[Principal, Depends(caller)], limits: Annotated[Limits, Depends(get_limits)]
) -> Principal:
    """The caller, counted against its request limit (routes that spend compute or storage)."""
    await limits.admit(who.id)
    return who


Caller = Annotated[Principal, Depends(caller)]
Admin = Annotated[Principal, Depends(admin)]
Limited = Annotated[Principal, Depends(limited)]
LimitsDep = Annotated[Limits, Depends(get_limits)]
