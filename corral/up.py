"""`corral up`: embedded Valkey, the gateway, one worker and a job runner on this machine, as child
processes."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

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


def ui_command(settings: Settings) -> list[str]:
    """`streamlit run` on the installed UI, on `ui_port`, without telemetry or a browser."""
    import ui

    app = Path(ui.__file__).parent / "app.py"
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(app),
        "--server.port",
        str(settings.ui_port),
        "--server.address",
        settings.host,
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        "--client.toolbarMode",
        "minimal",  # no "Deploy" button: this is a served app, not a dev session
    ]


# Server secrets the UI (a client of the gateway) has no business holding.
_SERVER_ONLY = (
    "CORRAL_API_KEYS",
    "CORRAL_ADMIN_KEYS",
    "CORRAL_API_KEY_FILE",
    "CORRAL_INTERNAL_KEY",
    "CORRAL_UPSTREAM_API_KEY",
    "CORRAL_REDIS_URL",
)


def ui_env(settings: Settings) -> dict[str, str]:
    """The UI's environment: where the gateway is and the one key it calls it with (its own
    CORRAL_API_KEY if set, else Corral's internal key), and none of the server's secrets."""
    env = child_env(settings)
    env.setdefault("CORRAL_GATEWAY_URL", settings.own_gateway_url)
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


def _wait_until_served(
    url: str, models: list[str], children: list[subprocess.Popen], key: str | None
) -> bool:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    deadline = time.monotonic() + _READY_TIMEOUT_S
    waiting = ", ".join(models)
    with console.status(f"waiting for workers to serve {waiting} (the first start converts the model)"):
        while time.monotonic() < deadline:
            if any(child.poll() is not None for child in children):
                return False
            try:
                listed = httpx.get(f"{url}/v1/models", headers=headers, timeout=2).json()["data"]
                if {m["id"] for m in listed} >= set(models):
                    return True
            except (httpx.HTTPError, KeyError, ValueError, TypeError):
                pass
            time.sleep(0.5)
    return False


def _child(command: list[str], env: dict[str, str], **options) -> subprocess.Popen:
    """A component in a session of its own: a terminal's Ctrl-C reaches only `corral up`, which
    stops the components in order (workers hand their requests back while Redis still runs)."""
    return subprocess.Popen(command, env=env, start_new_session=True, **options)


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


# Flags that describe one model: with several --model, each is described in --model-info-file.
_ONE_MODEL_ONLY = (
    "served_name",
    "display_name",
    "model_link",
    "organization",
    "model_license",
    "model_description",
    "lora",
    "profiles",
    "upstream_url",
    "upstream_model",
)


def worker_settings(settings: Settings, models: list[str], default_profile: bool) -> list[Settings]:
    """One worker's settings per model. A lone model gets a concise profile beside it (unless
    profiles are given or it is turned off), so that the arena has two contestants at once."""
    if len(models) > 1:
        given = [name for name in _ONE_MODEL_ONLY if getattr(settings, name)]
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise ValueError(f"{flags} describe one model; with several --model, use --model-info-file")
        if len(set(models)) < len(models):
            raise ValueError("a --model is given twice")
        named = settings.worker_id
        return [
            settings.with_overrides(model=model, worker_id=f"{named}-{i}" if named else None)
            for i, model in enumerate(models)
        ]
    one = settings.with_overrides(model=models[0])
    if default_profile and not one.profiles:
        one = one.with_overrides(profiles=["concise"])
    return [one]


def served_names(settings: Settings) -> list[str]:
    """The names a worker with these settings serves (its model, adapters and profiles)."""
    from workers.profiles import profile_name

    adapters = [spec.partition("=")[0].strip() for spec in settings.lora]
    profiles = [profile_name(spec, settings.model_name) for spec in settings.profiles]
    return [settings.model_name, *adapters, *profiles]


def up(settings: Settings, models: list[str] | None = None, default_profile: bool = True) -> int:
    try:
        workers = worker_settings(settings, models or [settings.model], default_profile)
    except ValueError as e:
        console.print(f"[red]{e}[/red]")
        return 2
    valkey = None
    if not settings.redis_url:
        valkey = EmbeddedValkey(settings.home / "valkey", settings.valkey_port, own_session=True)
        with console.status("starting embedded Valkey"):
            settings = settings.with_overrides(redis_url=valkey.ensure())
        port = urlsplit(settings.redis_url).port
        print(f"Redis: embedded Valkey on 127.0.0.1:{port}, data in {valkey.data_dir}", flush=True)
        print(
            f'  look inside: redis-cli -p {port} --user corral --pass "$(cat {valkey.password_path})"',
            flush=True,
        )
    if keys_on(settings) and settings.internal_key is None:
        # The key of Corral's own calls: the readiness probe below, the UI, the judge's requests.
        settings = settings.with_overrides(internal_key=secrets.token_urlsafe(32))
    env = child_env(settings)
    worker_envs = [
        child_env(one.with_overrides(redis_url=settings.redis_url, internal_key=settings.internal_key))
        for one in workers
    ]
    worker_command = [sys.executable, "-m", "workers"]
    gateway = _child([sys.executable, "-m", "gateway"], env)
    running = [_child(worker_command, worker_env) for worker_env in worker_envs]
    others = [
        gateway,
        _child([sys.executable, "-m", "corral", "jobs"], env),
        _child(ui_command(settings), ui_env(settings), stdout=subprocess.DEVNULL),
    ]
    restarts: list[float] = []
    url = settings.own_gateway_url
    ui_url = f"http://{settings.host}:{settings.ui_port}"
    names = [name for one in workers for name in served_names(one)]
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        internal = settings.internal_key.get_secret_value() if settings.internal_key else None
        if not _wait_until_served(url, names, [*running, *others], internal):
            console.print("[red]Corral did not come up; see the log above.[/red]")
            return 1
        write_state(settings, url, ui_url, names, gateway, running, others)
        print(f"Corral is up. OpenAI API: {url}/v1  models: {', '.join(names)}", flush=True)
        print(f"Web UI (chat, arena, leaderboard): {ui_url}", flush=True)
        print(f"Try: {_corral()} chat    (Ctrl-C here, or {_corral()} stop, stops everything)", flush=True)
        while not stopping:
            for i, worker in enumerate(running):
                if worker.poll() is not None and _may_restart(restarts):
                    # A worker exits on its own when its engine dies (its requests are handed
                    # back): start it again, as compose's restart policy does.
                    console.print(f"[yellow]a worker exited ({worker.returncode}); starting it again[/]")
                    running[i] = _child(worker_command, worker_envs[i])
                    write_state(settings, url, ui_url, names, gateway, running, others)
            if any(child.poll() is not None for child in [*running, *others]):
                console.print("[red]a component exited; stopping[/red]")
                return 1
            time.sleep(0.5)
        return 0
    finally:
        _stop([*running, *others])
        if valkey is not None:
            valkey.stop()
        state_path(settings).unlink(missing_ok=True)  # last: `corral stop` waits for it to go


def _corral() -> str:
    """How to run `corral` from where the user is: the bare name if it is on PATH (an activated
    venv), else the path of this one (after `make up`: .venv/bin/corral)."""
    here = Path(sys.argv[0])
    if here.name != "corral":
        return f"{Path(sys.executable).name} -m corral"
    found = shutil.which("corral")
    if found and Path(found).resolve() == here.resolve():
        return "corral"
    try:
        return str(here.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(here.resolve())


def state_path(settings: Settings) -> Path:
    return settings.home / "up.json"


def write_state(
    settings: Settings,
    url: str,
    ui_url: str,
    names: list[str],
    gateway: subprocess.Popen,
    workers: list[subprocess.Popen],
    others: list[subprocess.Popen],
) -> None:
    """What `corral status` and `corral stop` read: this process, its children, where they serve."""
    state = {
        "pid": os.getpid(),
        "api": f"{url}/v1",
        "ui": ui_url,
        "models": names,
        "redis": redact(settings.redis_url or ""),
        "processes": {
            "gateway": gateway.pid,
            "workers": [w.pid for w in workers],
            "jobs": others[1].pid,
            "ui": others[2].pid,
        },
        "started_at": time.time(),
    }
    state_path(settings).write_text(json.dumps(state, indent=2))


def _alive(pid: int) -> bool:
    """Whether the process runs (one that has exited but not been reaped yet does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (macOS): os.kill's answer stands
        return True


def read_state(settings: Settings) -> dict | None:
    """The running `corral up`'s state, or None when none runs (a stale file is removed)."""
    try:
        state = json.loads(state_path(settings).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or not _alive(int(state.get("pid", 0))):
        state_path(settings).unlink(missing_ok=True)
        return None
    return state


def status(settings: Settings) -> int:
    """`corral status`: what `corral up` runs, where, and how to stop it; 0 if it is running."""
    state = read_state(settings)
    if state is None:
        print(f"Corral is not running (no `corral up` under {settings.home}). Start it: make up")
        return 1
    up_for = time.time() - state["started_at"]
    print(f"Corral is up (pid {state['pid']}, for {up_for / 60:.0f} min)")
    print(f"  OpenAI API  {state['api']}")
    print(f"  web UI      {state['ui']}")
    print(f"  Redis       {state['redis']}")
    headers = {}
    if settings.internal_key is not None:
        headers["Authorization"] = f"Bearer {settings.internal_key.get_secret_value()}"
    try:
        served = httpx.get(f"{state['api']}/models", headers=headers, timeout=3).json()["data"]
        print(f"  models      {', '.join(m['id'] for m in served) or 'none served right now'}")
    except (httpx.HTTPError, KeyError, ValueError, TypeError):
        print(f"  models      {', '.join(state['models'])} (the gateway did not answer just now)")
    processes = state["processes"]
    pids = [
        ("gateway", processes["gateway"]),
        *(("worker", pid) for pid in processes["workers"]),
        ("job runner", processes["jobs"]),
        ("web UI", processes["ui"]),
    ]
    listed = ", ".join(f"{name} {pid}{'' if _alive(pid) else ' (gone)'}" for name, pid in pids)
    print(f"  processes   {listed}")
    print(f"Stop it: {_corral()} stop (or make stop, or Ctrl-C where it runs)")
    return 0


def stop(settings: Settings, timeout_s: float = 60) -> int:
    """`corral stop`: ask the running `corral up` to stop, and wait until it has."""
    state = read_state(settings)
    if state is None:
        print("Corral is not running.")
        return 0
    pid = int(state["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    with console.status(f"stopping Corral (pid {pid})"):
        while _alive(pid) and state_path(settings).exists() and time.monotonic() < deadline:
            time.sleep(0.2)
    if _alive(pid) and state_path(settings).exists():
        console.print(f"[red]Corral (pid {pid}) has not stopped after {timeout_s:.0f} s[/red]")
        return 1
    print("Corral stopped.")
    return 0
