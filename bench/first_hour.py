"""A new user's first minutes, timed: `make up` on a fresh clone with an empty home, until
"Corral is up", until the first chat answer, and until the first arena vote.

    python bench/first_hour.py [--keep]

Clones this repository (its committed HEAD) into a temporary folder, runs `make up` there with
an empty CORRAL_HOME (so the venv is built, the packages installed and the model converted),
then makes the first chat request and plays and votes in one arena battle over the API, as the
README shows. Prints each time from the start of `make up`. pip's download cache is the
machine's own: on a machine that never installed these packages, add the download time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keep", action="store_true", help="keep the clone and its home afterwards")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="corral-first-hour-"))
    clone, home = work / "corral", work / "home"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    port, ui_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CORRAL_", "VIRTUAL_ENV"))}
    env.update(CORRAL_HOME=str(home), CORRAL_PORT=str(port), CORRAL_UI_PORT=str(ui_port))
    api = f"http://127.0.0.1:{port}/v1"
    times: dict[str, float] = {}
    start = time.monotonic()
    up = subprocess.Popen(
        ["make", "up"], cwd=clone, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        for line in up.stdout:
            print(line, end="")
            if line.startswith("Corral is up"):
                times["Corral is up"] = time.monotonic() - start
                break
        else:
            raise SystemExit("make up ended before Corral was up")
        model = httpx.get(f"{api}/models", timeout=10).json()["data"][0]["id"]
        answer = httpx.post(
            f"{api}/chat/completions",
            timeout=300,
            json={
                "model": model,
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
            },
        )
        answer.raise_for_status()
        times["first chat answer"] = time.monotonic() - start
        battle = httpx.post(f"{api}/arena/battles", json={}, timeout=10).json()
        with httpx.stream(
            "POST", f"{api}/arena/battles/{battle['id']}/turns", json={"content": "Hi!"}, timeout=300
        ) as turn:
            turn.read()
        vote = httpx.post(f"{api}/arena/battles/{battle['id']}/vote", json={"vote": "tie"}, timeout=10)
        vote.raise_for_status()
        times["first arena vote"] = time.monotonic() - start
        print("\nrevealed:", ", ".join(vote.json()["models"]))
    finally:
        os.killpg(up.pid, signal.SIGINT)
        up.wait(timeout=120)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'from `make up` on a fresh clone, empty home':<45} seconds")
    for name, seconds in times.items():
        print(f"  {name:<43} {seconds:7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
