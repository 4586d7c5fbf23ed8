"""Scaling over workers: does a second worker of the same model double what the model serves,
with queue depth, not a controller, sharing the load?

One gateway; first one worker, then two, of the same model, each with --threads model threads.
The same load runs against both set-ups: rounds of --concurrency streamed requests of exactly
--max-tokens tokens. Printed for each set-up: aggregate output tokens/s, and for each worker the
requests and tokens it served (from its heartbeat) and the CPU time its process used (user +
system, all threads, from /proc).

A worker's tokens per CPU-second is what it serves with a core of its own: if that figure holds
when a second worker joins, then on a machine with a core per worker (or a GPU each) two workers
serve twice what one does; the sum is printed as the projected throughput. On a machine with
fewer cores than workers + gateway + Redis, the measured tokens/s is printed too but is bounded
by the cores, not by Corral.

    python bench/scaling.py
    python bench/scaling.py --concurrency 32 --rounds 3 --threads 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.serve import batch, gateway_generate, start_stack
from broker.connection import connect
from broker.keys import Keys
from broker.registry import WorkerRegistry
from broker.schemas import WorkerInfo
from broker.settings import Settings
from corral.up import child_env


def start_worker(settings: Settings, prefix: str, worker_id: str) -> subprocess.Popen:
    env = child_env(settings) | {"CORRAL_KEY_PREFIX": prefix, "CORRAL_WORKER_ID": worker_id}
    return subprocess.Popen([sys.executable, "-m", "workers"], env=env)


def cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


async def load(client: httpx.AsyncClient, model: str, args: argparse.Namespace) -> tuple[int, float]:
    async def generate(messages: list[dict], max_tokens: int):
        return await gateway_generate(client, model, messages, max_tokens)

    await generate([{"role": "user", "content": "Hello"}], 4)  # warm-up
    tokens, wall = 0, 0.0
    for r in range(args.rounds):
        _, round_tokens, round_wall = await batch(
            generate, args.concurrency, r * args.concurrency, args.max_tokens
        )
        tokens += round_tokens
        wall += round_wall
    return tokens, wall


async def measure(
    registry: WorkerRegistry,
    client: httpx.AsyncClient,
    settings: Settings,
    args: argparse.Namespace,
    workers: dict[str, psutil.Process],
) -> dict:
    """The load once; what each worker served and the CPU time it used meanwhile."""

    async def infos() -> dict[str, WorkerInfo]:
        await asyncio.sleep(2 * settings.heartbeat_s)  # heartbeats carry the latest counts
        return {w.worker_id: w for w in await registry.live()}

    deadline = time.monotonic() + 600
    while not set(workers) <= set(await infos()):
        if time.monotonic() > deadline:
            raise TimeoutError("the workers did not register")
    before, before_cpu = await infos(), {w: cpu_s(p) for w, p in workers.items()}
    tokens, wall = await load(client, settings.model_name, args)
    after, after_cpu = await infos(), {w: cpu_s(p) for w, p in workers.items()}
    per_worker = {}
    for w in workers:
        served, used = after[w].tokens_out - before[w].tokens_out, after_cpu[w] - before_cpu[w]
        per_worker[w] = {
            "requests": after[w].requests_done - before[w].requests_done,
            "tokens": served,
            "cpu_s": used,
            "tokens_per_cpu_s": served / used if used else 0.0,
        }
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "workers": per_worker}


def report(name: str, result: dict) -> None:
    projected = sum(w["tokens_per_cpu_s"] for w in result["workers"].values())
    print(
        f"{name}: {result['tokens_per_s']:7.1f} tok/s measured, {projected:7.1f} tok/s projected "
        f"(a core per worker)",
        flush=True,
    )
    for worker_id, w in result["workers"].items():
        print(
            f"    {worker_id:>10}: {w['requests']:>4} requests  {w['tokens']:>6} tokens  "
            f"{w['cpu_s']:7.1f} CPU-s  {w['tokens_per_cpu_s']:6.1f} tokens per CPU-s",
            flush=True,
        )


async def both(
    settings: Settings, args: argparse.Namespace, prefix: str, url: str, processes: list[subprocess.Popen]
) -> dict:
    """One worker, then two: the second joins the running stack."""
    redis = connect(settings.redis_url)
    registry = WorkerRegistry(redis, Keys(prefix))
    limits = httpx.Limits(
        max_connections=args.concurrency + 8, max_keepalive_connections=args.concurrency + 8
    )
    results = {}
    async with httpx.AsyncClient(base_url=url, timeout=1800, limits=limits) as client:
        workers = {"worker-1": psutil.Process(processes[1].pid)}
        results["one worker"] = await measure(registry, client, settings, args, workers)
        report("one worker ", results["one worker"])
        processes.append(start_worker(settings, prefix, "worker-2"))
        workers["worker-2"] = psutil.Process(processes[-1].pid)
        results["two workers"] = await measure(registry, client, settings, args, workers)
        report("two workers", results["two workers"])
    await redis.aclose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="model threads per worker")
    parser.add_argument("--max-batch", type=int, default=16, help="batch slots per worker")
    parser.add_argument("--port", type=int, default=8077)
    parser.add_argument("--out", default="bench/results/scaling.json")
    args = parser.parse_args()

    settings = Settings().with_overrides(
        port=args.port,
        threads=args.threads,
        max_batch=args.max_batch,
        kv_cache_tokens=32768,
        worker_id="worker-1",
    )
    if not settings.redis_url:
        settings = settings.with_overrides(redis_url="redis://127.0.0.1:6379/0")
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    print(
        f"model {settings.model}, {args.threads} thread(s) and {args.max_batch} slots per worker, "
        f"{args.concurrency} streams of {args.max_tokens} tokens, {args.rounds} rounds",
        flush=True,
    )
    processes, url = start_stack(settings, prefix)
    try:
        results = asyncio.run(both(settings, args, prefix, url, processes))
    finally:
        for p in processes:
            p.terminate()
        for p in processes:
            p.wait(timeout=60)

    one, two = results["one worker"], results["two workers"]
    projected_one = sum(w["tokens_per_cpu_s"] for w in one["workers"].values())
    projected_two = sum(w["tokens_per_cpu_s"] for w in two["workers"].values())
    print(
        f"\ntwo workers / one: {two['tokens_per_s'] / one['tokens_per_s']:.2f}x measured on "
        f"{psutil.cpu_count()} cores, {projected_two / projected_one:.2f}x projected with a core per worker"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
