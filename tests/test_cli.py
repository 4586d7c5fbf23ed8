"""The `corral` command: `corral up` on a fresh home, and the terminal chat's session."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest
import redis

from corral.chat import ChatSession
from tests.conftest import HOME, MODEL, Stack, free_port
from tests.test_ui import wait_for_ui


def test_corral_up_with_keys_starts_valkey_gateway_worker_and_ui_and_prints_the_urls(
    tmp_path, model_path
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(HOME / "models")  # reuse the converted model, not the conversion
    port, ui_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env.update(
        CORRAL_HOME=str(home), CORRAL_PORT=str(port), CORRAL_THREADS="1", CORRAL_KV_CACHE_TOKENS="4096",
        CORRAL_UI_PORT=str(ui_port), CORRAL_API_KEYS="user-key", CORRAL_ADMIN_KEYS="admin-key",
        CORRAL_FAULT_INJECTION="true",
    )  # fmt: skip
    user = {"Authorization": "Bearer user-key"}
    up = subprocess.Popen([sys.executable, "-m", "corral", "up"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        line = up.stdout.readline()
        assert f"http://127.0.0.1:{port}/v1" in line, line
        ui_line = up.stdout.readline()
        assert f"http://127.0.0.1:{ui_port}" in ui_line, ui_line
        wait_for_ui(f"http://127.0.0.1:{ui_port}")
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", headers=user).json()["data"][0]["id"] == MODEL
        reply = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
            headers=user,
            timeout=60,
        ).json()
        assert reply["usage"]["completion_tokens"] >= 1
        assert (home / "valkey" / "appendonlydir").is_dir()
        # The UI calls with a key of its own and holds none of the server's secrets.
        ui = next(p for p in psutil.Process(up.pid).children() if "streamlit" in " ".join(p.cmdline()))
        ui_env = ui.environ()
        assert ui_env.get("CORRAL_API_KEY") and ui_env["CORRAL_API_KEY"] not in ("user-key", "admin-key")
        assert not {"CORRAL_API_KEYS", "CORRAL_ADMIN_KEYS", "CORRAL_REDIS_URL"} & set(ui_env)
        models = httpx.get(
            f"http://127.0.0.1:{port}/v1/models",
            headers={"Authorization": f"Bearer {ui_env['CORRAL_API_KEY']}"},
        )
        assert models.status_code == 200
        # The embedded Valkey answers only with its password.
        url = json.loads((home / "valkey" / "server.json").read_text())["url"]
        with pytest.raises(redis.exceptions.NoPermissionError):
            redis.Redis(port=redis.Redis.from_url(url).connection_pool.connection_kwargs["port"]).keys()
        # A worker whose engine dies exits, and `corral up` starts it again; the request that was
        # running when it died is answered by the new one.
        worker = next(p for p in psutil.Process(up.pid).children() if p.cmdline()[-2:] == ["-m", "workers"])
        worker.send_signal(signal.SIGUSR2)  # its engine's thread dies at the next step
        survived = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
            headers=user,
            timeout=240,
        )
        assert survived.status_code == 200, survived.text
        workers = [p for p in psutil.Process(up.pid).children() if p.cmdline()[-2:] == ["-m", "workers"]]
        assert [w.pid for w in workers] != [worker.pid] and not worker.is_running()
    finally:
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=60) == 0
    # Everything it started is gone with it, the embedded Valkey included.
    time.sleep(0.5)
    assert not (home / "valkey" / "server.json").exists()


def test_chat_session_streams_regenerates_and_round_trips_a_conversation(stack: Stack, tmp_path) -> None:
    with httpx.Client(base_url=stack.url, timeout=60) as client:
        session = ChatSession(client, MODEL, temperature=0, max_tokens=12, system="Be brief.")
        session.messages.append({"role": "user", "content": "Name a colour."})
        first = "".join(session.stream_reply())
        assert first and session.messages[-1] == {"role": "assistant", "content": first}

        again = "".join(session.regen())
        assert again == first  # greedy: the same reply, and it replaced the old one
        assert [m["role"] for m in session.messages] == ["system", "user", "assistant"]

        session.save(tmp_path / "chat.json")
        session.reset()
        assert session.messages == [{"role": "system", "content": "Be brief."}]
        session.load(tmp_path / "chat.json")
        assert session.messages[-1]["content"] == first
