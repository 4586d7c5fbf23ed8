"""`corral up`: embedded Valkey, the gateway, one worker and a job runner on this machine, as child
processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from pydantic import SecretStr
from rich.console import Console

from broker.connection import EmbeddedValkey
from broker.settings import Settings

console = Console(stderr=True)

_READY_TIMEOUT_S = 600


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
    if settings.gateway_url:
        return settings.gateway_url
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    return f"http://{host}:{settings.port}"


def ui_command(settings: Settings) -> list[str]:
    """`streamlit run` on the installed UI, on `ui_port`, without telemetry or a browser."""
    import ui

    app = Path(ui.__file__).parent / "app.py"
    return [
        sys.executable, "-m", "streamlit", "run", str(app), "--server.port", str(settings.ui_port),
        "--server.address", settings.host, "--server.headless", "true", "--browser.gatherUsageStats", "false",
    ]  # fmt: skip


def ui_env(settings: Settings) -> dict[str, str]:
    env = child_env(settings)
    env.setdefault("CORRAL_GATEWAY_URL", gateway_url(settings))
    return env


def run_ui(settings: Settings) -> int:
    """`corral ui`: the web UI in the foreground."""
    return subprocess.call(ui_command(settings), env=ui_env(settings))


def _wait_until_served(url: str, model: str, children: list[subprocess.Popen]) -> bool:
    deadline = time.monotonic() + _READY_TIMEOUT_S
    with console.status(f"waiting for a worker to serve {model} (the first start converts the model)"):
        while time.monotonic() < deadline:
            if any(child.poll() is not None for child in children):
                return False
            try:
                served = httpx.get(f"{url}/v1/models", timeout=2).json()["data"]
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


def up(settings: Settings) -> int:
    valkey = None
    if not settings.redis_url:
        valkey = EmbeddedValkey(settings.home / "valkey")
        with console.status("starting embedded Valkey"):
            settings = settings.with_overrides(redis_url=valkey.ensure())
        console.print(f"Redis: embedded Valkey at {settings.redis_url} (AOF in {valkey.data_dir})")
    env = child_env(settings)
    children = [
        subprocess.Popen([sys.executable, "-m", "gateway"], env=env),
        subprocess.Popen([sys.executable, "-m", "workers"], env=env),
        subprocess.Popen([sys.executable, "-m", "corral", "jobs"], env=env),
        subprocess.Popen(ui_command(settings), env=ui_env(settings), stdout=subprocess.DEVNULL),
    ]
    url = gateway_url(settings)
    ui_url = f"http://{settings.host}:{settings.ui_port}"
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        if not _wait_until_served(url, settings.model_name, children):
            console.print("[red]Corral did not come up; see the log above.[/red]")
            return 1
        print(f"Corral is up. OpenAI API: {url}/v1  model: {settings.model_name}", flush=True)
        print(f"Web UI (chat, arena, leaderboard): {ui_url}", flush=True)
        console.print(f"Try: corral chat --url {url}    (Ctrl-C stops everything)")
        while not stopping:
            if any(child.poll() is not None for child in children):
                console.print("[red]a component exited; stopping[/red]")
                return 1
            time.sleep(0.5)
        return 0
    finally:
        _stop(children)
        if valkey is not None:
            valkey.stop()
