"""Transport ceiling: how many requests and streamed tokens one gateway and one worker move when
the engine costs nothing.

The worker here is Corral's real runtime (claim → admit → step → publish → ack, the real
tokenizer, detokenizer, chat template and Redis) around `TokenTap`, a benchmark-only engine that
emits tokens at once instead of running a model. The load comes from wrk (Debian's `wrk`), so
the client is not what limits the figures:

- short: non-streamed chat completions of 1 token; requests/s;
- streamed: streamed chat completions of --stream-tokens tokens; output tokens/s.

With --profile, py-spy samples the gateway and the worker during each run and the busiest
functions are printed.

    python bench/transport.py
    python bench/transport.py --connections 64 --duration 10 --profile
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker.settings import Settings
from tests.helpers import TokenTap


def run_worker(tokens_per_step: int) -> None:
    """The worker process: Corral's runtime around TokenTap."""
    from transformers import AutoTokenizer

    from broker.connection import connect
    from broker.keys import Keys
    from workers.loading import resolve_model_path
    from workers.runtime import Worker
    from workers.sequence import TokenFrontend

    settings = Settings()

    async def serve() -> None:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(settings.model, settings.home))
        redis = connect(settings.redis_url)
        engine = TokenTap(tokenizer, settings.max_batch, tokens_per_step)
        frontend = TokenFrontend(tokenizer)
        worker = Worker(engine, frontend, redis, Keys(settings.key_prefix), settings.model_name, "none")
        await worker.run()

    asyncio.run(serve())


# --------------------------------------------------------------------------- driver

WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [[%s]]
"""


def wrk(url: str, body: dict, connections: int, duration_s: int) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT % json.dumps(body))
    command = [
        "wrk",
        "-t",
        "1",
        "-c",
        str(connections),
        "-d",
        f"{duration_s}s",
        "--timeout",
        "30s",
        "-s",
        script.name,
        f"{url}/v1/chat/completions",
    ]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    os.unlink(script.name)
    requests_per_s = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    latency = re.search(r"Latency\s+(\S+)", output).group(1)
    non_2xx = int(bad.group(1)) if bad else 0
    return {"requests_per_s": requests_per_s, "non_2xx": non_2xx, "latency_avg": latency}


def profile(pids: dict[str, int], duration_s: int) -> list[subprocess.Popen]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    spies = []
    for name, pid in pids.items():
        command = [
            spy,
            "record",
            "-p",
            str(pid),
            "-d",
            str(duration_s),
            "-r",
            "50",
            "--nonblocking",
            "--format",
            "raw",
            "-o",
            f"/tmp/corral-transport-{name}.txt",
        ]
        spies.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return spies


def hottest(name: str, top: int = 15) -> None:
    """Self time by function from a py-spy raw profile."""
    own: Counter[str] = Counter()
    total = 0
    for line in Path(f"/tmp/corral-transport-{name}.txt").read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if any(idle in frames[-1] for idle in ("select", "epoll", "Condition.wait", "_worker thread")):
            continue  # waiting, not working
        total += int(count)
        own[frames[-1].split(" (")[0] + " " + frames[-1].rsplit("/", 1)[-1]] += int(count)
    print(f"  {name}: busiest functions (share of {total} busy samples, self time)")
    for frame, count in own.most_common(top):
        print(f"    {100 * count / max(total, 1):5.1f}%  {frame[:100]}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=int, default=10, help="seconds per run")
    parser.add_argument("--stream-tokens", type=int, default=512)
    parser.add_argument("--tokens-per-step", type=int, default=8)
    parser.add_argument("--port", type=int, default=8077)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return run_worker(args.tokens_per_step)
    if not shutil.which("wrk"):
        sys.exit("needs wrk: apt-get install wrk")

    settings = Settings()
    env = dict(
        os.environ,
        CORRAL_KEY_PREFIX=f"bench-{uuid.uuid4().hex[:8]}",
        CORRAL_PORT=str(args.port),
        CORRAL_REDIS_URL=settings.redis_url or "redis://127.0.0.1:6379/0",
        CORRAL_MAX_BATCH=str(args.connections * 2),
        CORRAL_MAX_BACKLOG="0",
        CORRAL_SERVED_NAME="tap",
    )
    gateway = subprocess.Popen([sys.executable, "-m", "gateway"], env=env)
    worker = subprocess.Popen(
        [sys.executable, __file__, "--worker", "--tokens-per-step", str(args.tokens_per_step)], env=env
    )
    url = f"http://127.0.0.1:{args.port}"
    try:
        while True:
            try:
                if httpx.get(f"{url}/v1/models", timeout=1).json()["data"]:
                    break
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(0.3)
        runs = {
            "short": {"model": "tap", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
            "streamed": {
                "model": "tap",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": args.stream_tokens,
                "stream": True,
            },
        }
        results = {}
        for name, body in runs.items():
            wrk(url, body, args.connections, 2)  # warm-up
            pids = {"gateway": gateway.pid, "worker": worker.pid}
            spies = profile(pids, args.duration) if args.profile else []
            results[name] = wrk(url, body, args.connections, args.duration)
            for spy in spies:
                spy.wait()
            r = results[name]
            tokens_per_s = r["requests_per_s"] * args.stream_tokens
            extra = f"   {tokens_per_s:,.0f} tokens/s" if name == "streamed" else ""
            print(
                f"{name:>9}: {r['requests_per_s']:8.0f} requests/s{extra}   latency avg {r['latency_avg']}"
                f"   non-2xx {r['non_2xx']}",
                flush=True,
            )
            if args.profile:
                hottest("gateway")
                hottest("worker")
    finally:
        for p in (gateway, worker):
            p.terminate()
        for p in (gateway, worker):
            p.wait(timeout=30)


if __name__ == "__main__":
    main()
