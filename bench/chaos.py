"""Chaos benchmark: requests keep flowing while workers are killed with SIGKILL.

Runs the same requests twice through one gateway and two workers: once undisturbed (the
reference texts and latency), once while a worker is killed every --kill-every-s seconds and
restarted. Temperature 0, so every answer must equal its undisturbed text. Prints sent,
completed, lost, wrong (text differs: a duplicated or missing token) and p95 latency for both.

    python bench/chaos.py --requests 32 --concurrency 8 --kill-every-s 6
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker.settings import Settings

TOPICS = ["a lighthouse", "rain", "a lost key", "the moon", "a robot", "an old map", "a jazz band", "a fox"]


class Cluster:
    """A gateway and workers as child processes, on a key prefix of their own."""

    def __init__(self, settings: Settings, workers: int) -> None:
        self.env = dict(os.environ)
        self.env.update(
            {f"CORRAL_{k.upper()}": str(v) for k, v in settings.model_dump().items() if v is not None}
        )
        self.env.update(
            CORRAL_KEY_PREFIX=f"chaos-{uuid.uuid4().hex[:8]}",
            CORRAL_HEARTBEAT_S="0.25",
            CORRAL_WORKER_TTL_S="1.5",
        )
        self.url = f"http://{settings.host}:{settings.port}"
        self.gateway = subprocess.Popen([sys.executable, "-m", "gateway"], env=self.env)
        self.workers = [self._worker() for _ in range(workers)]

    def _worker(self) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "workers"], env=self.env, stderr=subprocess.DEVNULL)

    def wait_ready(self, workers: int) -> None:
        while True:
            try:
                models = httpx.get(f"{self.url}/v1/models", timeout=1).json()["data"]
                if models:
                    time.sleep(0.5 * workers)  # let the others register too
                    return
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(0.5)

    def kill_one(self, index: int) -> None:
        victim = self.workers[index % len(self.workers)]
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        self.workers[index % len(self.workers)] = self._worker()

    def stop(self) -> None:
        for process in [self.gateway, *self.workers]:
            process.terminate()
        for process in [self.gateway, *self.workers]:
            process.wait(timeout=30)


async def one(client: httpx.AsyncClient, model: str, i: int, max_tokens: int) -> tuple[str | None, float]:
    question = f"Write a short story about {TOPICS[i % len(TOPICS)]}."
    body = {
        "model": model,
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
        "messages": [{"role": "user", "content": question}],
    }
    start = time.perf_counter()
    text = ""
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                return None, 0.0
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        return None, 0.0
                    text += chunk["choices"][0]["delta"].get("content") or ""
    except httpx.HTTPError:
        return None, 0.0
    return text, time.perf_counter() - start


async def run(
    cluster: Cluster, model: str, args: argparse.Namespace, chaos: bool
) -> list[tuple[str | None, float]]:
    semaphore = asyncio.Semaphore(args.concurrency)

    async def limited(client: httpx.AsyncClient, i: int):
        async with semaphore:
            return await one(client, model, i, args.max_tokens)

    async def killer() -> int:
        kills = 0
        while True:
            await asyncio.sleep(args.kill_every_s)
            cluster.kill_one(kills)
            kills += 1
            print(f"  killed a worker ({kills})", flush=True)

    async with httpx.AsyncClient(base_url=cluster.url, timeout=600) as client:
        chaos_task = asyncio.create_task(killer()) if chaos else None
        results = await asyncio.gather(*(limited(client, i) for i in range(args.requests)))
        if chaos_task:
            chaos_task.cancel()
    return results


def report(name: str, results: list, reference: list | None) -> None:
    completed = [text for text, _ in results if text is not None]
    lost = len(results) - len(completed)
    wrong = (
        0
        if reference is None
        else sum(
            1
            for (text, _), (ref, _) in zip(results, reference, strict=True)
            if text is not None and text != ref
        )
    )
    latencies = sorted(t for text, t in results if text is not None)
    p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] if latencies else float("nan")
    print(
        f"{name:>12}: sent {len(results)}  completed {len(completed)}  lost {lost}  wrong {wrong}  "
        f"latency p50 {statistics.median(latencies):.2f}s  p95 {p95:.2f}s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--kill-every-s", type=float, default=6.0)
    parser.add_argument("--port", type=int, default=8078)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--no-batch-invariant", action="store_true", help="expect 'wrong' answers in bf16")
    args = parser.parse_args()
    # Batch invariance on: a takeover changes which requests share a batch, and without it a
    # bf16 token (this CPU's default dtype) depends on that; "wrong" must mean a lost or
    # repeated token, not rounding.
    settings = Settings().with_overrides(
        port=args.port,
        threads=1,
        dtype=args.dtype,
        batch_invariant=not args.no_batch_invariant,
        max_batch=8,
        kv_cache_tokens=16384,
    )
    if not settings.redis_url:
        settings = settings.with_overrides(redis_url="redis://127.0.0.1:6379/0")
    cluster = Cluster(settings, workers=2)
    try:
        cluster.wait_ready(workers=2)
        print(f"{args.requests} requests, {args.concurrency} at a time, {args.max_tokens} tokens each")
        calm = asyncio.run(run(cluster, settings.model_name, args, chaos=False))
        report("no faults", calm, None)
        stormy = asyncio.run(run(cluster, settings.model_name, args, chaos=True))
        report("with kills", stormy, calm)
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
