"""The `corral` command: `corral up` on a fresh home, and the terminal chat's session."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import redis

from corral.chat import ChatSession
from tests.conftest import HOME, MODEL, Stack, free_port
from tests.helpers import wait_for_ui


def test_corral_up_with_keys_starts_valkey_gateway_worker_and_ui_and_prints_the_urls(
    tmp_path, model_path
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(HOME / "models")  # reuse the converted model, not the conversion
    port, ui_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env.update(
        CORRAL_HOME=str(home),
        CORRAL_PORT=str(port),
        CORRAL_THREADS="1",
        CORRAL_KV_CACHE_TOKENS="4096",
        CORRAL_UI_PORT=str(ui_port),
        CORRAL_API_KEYS="user-key",
        CORRAL_ADMIN_KEYS="admin-key",
        CORRAL_FAULT_INJECTION="true",
    )
    user = {"Authorization": "Bearer user-key"}
    up = subprocess.Popen([sys.executable, "-m", "corral", "up"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        line = up.stdout.readline()
        assert line.startswith("Redis: embedded Valkey on 127.0.0.1:"), line
        assert "redis-cli -p" in up.stdout.readline()  # how to look inside, password from its file
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


class Terminal:
    """The master side of a pseudo-terminal: what the program wrote, read as it comes."""

    def __init__(self, fd: int) -> None:
        self.fd, self.text, self.cursor = fd, "", 0

    def read(self, wait_s: float = 0.5) -> bool:
        import select

        if not select.select([self.fd], [], [], wait_s)[0]:
            return True
        try:
            chunk = os.read(self.fd, 4096)
        except OSError:  # the program ended
            return False
        self.text += chunk.decode(errors="replace")
        return bool(chunk)

    def expect(self, wanted: str, timeout_s: float = 120) -> str:
        """Waits for `wanted` after the last match; returns what came before it."""
        deadline = time.monotonic() + timeout_s
        while wanted not in self.text[self.cursor :]:
            if time.monotonic() > deadline or not self.read():
                raise AssertionError(f"no {wanted!r} within {timeout_s} s; the terminal showed:\n{self.text}")
        at = self.text.index(wanted, self.cursor)
        before, self.cursor = self.text[self.cursor : at], at + len(wanted)
        return before

    def write(self, keys: bytes) -> None:
        os.write(self.fd, keys)


def wait_until_reading(pid: int, timeout_s: float = 10) -> None:
    """Until the process is blocked reading its terminal, as it is once a person sees the prompt.
    (A signal that lands after the prompt is written but before the read begins is handled
    before the read, which then waits on; a person is never that fast, a test can be.)"""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            syscall = Path(f"/proc/{pid}/syscall").read_text().split()[0]
        except (OSError, IndexError):  # no /proc: give it the time a person would
            time.sleep(0.5)
            return
        if syscall in ("0", "63"):  # read(2) on x86_64 and on arm64
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} never waited for input")


def _abandoned(stack: Stack) -> float:
    metrics = httpx.get(f"{stack.url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("corral_requests_total{") and 'status="abandoned"' in line
    )


def test_ctrl_c_in_corral_chat_stops_the_answer_and_returns_to_the_prompt(stack: Stack) -> None:
    """`corral chat` in a pseudo-terminal, as a person runs it: Ctrl-C while it answers cancels
    the request and returns to the prompt, the next question works, Ctrl-C at the prompt exits."""
    import pty

    command = [
        sys.executable,
        "-m",
        "corral",
        "chat",
        "--url",
        stack.url,
        "--model",
        MODEL,
        "--temperature",
        "0",
        "--max-tokens",
        # Room to be still answering when Ctrl-C comes, however slow the terminal is read (an
        # answer that ends first is counted done, not abandoned).
        "1000",
    ]
    abandoned_before = _abandoned(stack)
    pid, fd = pty.fork()
    if pid == 0:  # the child: the pty is its controlling terminal, so Ctrl-C is a SIGINT to it
        # As in a person's shell. A test run started in the background by a shell without job
        # control inherits SIGINT ignored, and Python then leaves it ignored: Ctrl-C did nothing.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.execvpe(sys.executable, command, stack.env())
    terminal = Terminal(fd)
    try:
        terminal.expect("USER: ")
        terminal.write(b"Write a long story about a dragon who learns to bake bread.\r")
        terminal.expect("ASSISTANT: ")
        deadline = time.monotonic() + 120
        while len(terminal.text[terminal.cursor :].strip()) < 10:  # it has started answering
            assert time.monotonic() < deadline, terminal.text
            terminal.read()
        terminal.write(b"\x03")
        terminal.expect("(stopped)")
        terminal.expect("USER: ")
        deadline = time.monotonic() + 30  # the gateway saw the client go and cancelled the request
        while _abandoned(stack) <= abandoned_before:
            assert time.monotonic() < deadline, "the stopped request was not cancelled"
            time.sleep(0.2)

        terminal.write(b"Name a colour.\r")
        terminal.expect("ASSISTANT: ")
        reply = terminal.expect("USER: ")
        assert reply.strip() and "error" not in reply

        wait_until_reading(pid)  # a Ctrl-C between the prompt and its read would be lost
        terminal.write(b"\x03")  # at the prompt: leaves cleanly, on a new line
        _, status = os.waitpid(pid, 0)
        pid = 0
        for _ in range(50):  # what it wrote last, until the terminal closes
            if not terminal.read(0.1):
                break
        assert os.waitstatus_to_exitcode(status) == 0, terminal.text
        assert terminal.text.endswith("\n") and "Traceback" not in terminal.text
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
