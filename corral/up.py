"""`corral up`: embedded Valkey, the gateway, one worker and a job runner on this machine, as child
processes."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from pydantic import SecretStr
from rich.console import Console

from broker.connection import EmbeddedValkey, redact
from broker.settings import Settings

console = Console(stderr=True)

_READY_TIMEOUT_S = 600
# A worker that exits (its engine died) is started again, up to this often.
_MAX_RESTARTS = 5
_RESTART_WINDOW_S = 600


def child_env(settings: Settings) -> dict[str, str]:
    """The settings of this process, as the CORRAL_* environment of its children."""
    env = dict(os.environ)
    for name, value in settings.model_dump().items():
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if value is not None:
            # pydantic-settings reads a dict or list setting from the environment as JSON
            encoded = json.dumps(value) if isinstance(value, dict | list) else str(value)
            env[f"CORRAL_{name.upper()}"] = encoded
    return env


def gateway_url(settings: Settings) -> str:
    return settings.own_gateway_url


def ui_command(settings: Settings) -> list[str]:
    """`streamlit run` on the installed UI, on `ui_port`, without telemetry or a browser."""
    import ui

    app = Path(ui.__file__).parent / "app.py"
    return [
        sys.executable, "-m", "streamlit", "run", str(app), "--server.port", str(settings.ui_port),
        "--server.address", settings.host, "--server.headless", "true", "--browser.gatherUsageStats", "false",
    ]  # fmt: skip


# Server secrets the UI (a client of the gateway) has no business holding.
_SERVER_ONLY = ("CORRAL_API_KEYS", "CORRAL_ADMIN_KEYS", "CORRAL_API_KEY_FILE", "CORRAL_INTERNAL_KEY",
                "CORRAL_UPSTREAM_API_KEY", "CORRAL_REDIS_URL")  # fmt: skip


def ui_env(settings: Settings) -> dict[str, str]:
    """The UI's environment: where the gateway is and the one key it calls it with (its own
    CORRAL_API_KEY if set, else Corral's internal key), and none of the server's secrets."""
    env = child_env(settings)
    env.setdefault("CORRAL_GATEWAY_URL", gateway_url(settings))
    if "CORRAL_API_KEY" not in os.environ and settings.internal_key is not None:
        env["CORRAL_API_KEY"] = settings.internal_key.get_secret_value()
    for name in _SERVER_ONLY:
        env.pop(name, None)
    return env


def keys_on(settings: Settings) -> bool:
    return bool(settings.api_keys or settings.admin_keys or settings.api_key_file)


def run_ui(settings: Settings) -> int:
    """`corral ui`: the web UI in the foreground."""
    return subprocess.call(ui_command(settings), env=ui_env(settings))


def _wait_until_served(url: str, model: str, children: list[subprocess.Popen], key: str | None) -> bool:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    deadline = time.monotonic() + _READY_TIMEOUT_S
    with console.status(f"waiting for a worker to serve {model} (the first start converts the model)"):
        while time.monotonic() < deadline:
            if any(child.poll() is not None for child in children):
                return False
            try:
                served = httpx.get(f"{url}/v1/models", headers=headers, timeout=2).json()["data"]
                if any(m["id"] == model for m in served):
                    return True
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(0.5)
    return False


def _stop(children: list[subprocess.Popen]) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for child in children:
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()


def _may_restart(restarts: list[float]) -> bool:
    """At most _MAX_RESTARTS in _RESTART_WINDOW_S: a worker that cannot start is not retried forever."""
    now = time.monotonic()
    restarts[:] = [t for t in restarts if now - t < _RESTART_WINDOW_S]
    if len(restarts) >= _MAX_RESTARTS:
        return False
    restarts.append(now)
    return True


def up(settings: Settings) -> int:
    valkey = None
    if not settings.redis_url:
        valkey = EmbeddedValkey(settings.home / "valkey")
        with console.status("starting embedded Valkey"):
            settings = settings.with_overrides(redis_url=valkey.ensure())
        console.print(f"Redis: embedded Valkey at {redact(settings.redis_url)} (AOF in {valkey.data_dir})")
    if keys_on(settings) and settings.internal_key is None:
        # The key of Corral's own calls: the readiness probe below, the UI, the judge's requests.
        settings = settings.with_overrides(internal_key=secrets.token_urlsafe(32))
    env = child_env(settings)
    worker_command = [sys.executable, "-m", "workers"]
    children = [
        subprocess.Popen([sys.executable, "-m", "gateway"], env=env),
        subprocess.Popen(worker_command, env=env),
        subprocess.Popen([sys.executable, "-m", "corral", "jobs"], env=env),
        subprocess.Popen(ui_command(settings), env=ui_env(settings), stdout=subprocess.DEVNULL),
    ]
    restarts: list[float] = []
    url = gateway_url(settings)
    ui_url = f"http://{settings.host}:{settings.ui_port}"
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        internal = settings.internal_key.get_secret_value() if settings.internal_key else None
        if not _wait_until_served(url, settings.model_name, children, internal):
            console.print("[red]Corral did not come up; see the log above.[/red]")
            return 1
        print(f"Corral is up. OpenAI API: {url}/v1  model: {settings.model_name}", flush=True)
        print(f"Web UI (chat, arena, leaderboard): {ui_url}", flush=True)
        console.print(f"Try: corral chat --url {url}    (Ctrl-C stops everything)")
        while not stopping:
            worker = children[1]
            if worker.poll() is not None and _may_restart(restarts):
                # A worker exits on its own when its engine dies (its requests are handed back):
                # start it again, as compose's restart policy does.
                console.print(f"[yellow]the worker exited ({worker.returncode}); starting it again[/yellow]")
                children[1] = subprocess.Popen(worker_command, env=env)
            elif any(child.poll() is not None for child in children):
                console.print("[red]a component exited; stopping[/red]")
                return 1
            time.sleep(0.5)
        return 0
    finally:
        _stop(children)
        if valkey is not None:
            valkey.stop()
