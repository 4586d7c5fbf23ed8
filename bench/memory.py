"""Memory benchmark: worker RSS with the default model and 32 active streams, and gateway RSS
holding 500 idle SSE connections.

The worker's figure is its peak RSS sampled while 32 streamed requests generate together
(after load and warm-up, which are printed too). The idle connections are streamed requests for
a model whose only worker never claims anything, as when every worker is busy: each stays open
with its first chunk sent, waiting for tokens.

    python bench/memory.py
    python bench/memory.py --streams 32 --idle 500
"""

from __future__ import annotations

import argparse
import asyncio
import math
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.serve import start_stack
from broker.connection import connect
from broker.keys import Keys
from broker.registry import WorkerRegistry
from broker.schemas import WorkerInfo
from broker.settings import Settings

MIB = 1024 * 1024


class PeakRSS:
    """Samples a process's RSS every few milliseconds in a thread; keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        return self.process.memory_info().rss

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.now())

    def __enter__(self) -> PeakRSS:
        self.peak = self.now()
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()


async def active_streams(url: str, model: str, streams: int, tokens: int) -> int:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": True,
    }
    limits = httpx.Limits(max_connections=streams + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def one() -> int:
            chunks = 0
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                async for line in response.aiter_lines():
                    chunks += line.startswith("data: {")
            return chunks

        return sum(await asyncio.gather(*(one() for _ in range(streams))))


async def stalled_model(settings: Settings, prefix: str, name: str) -> None:
    """A model with a registered worker that never claims: its requests wait, streams stay open."""
    redis = connect(settings.redis_url)
    keys = Keys(prefix)
    info = WorkerInfo(worker_id=f"stalled-{name}", models=[name], device="cpu", max_batch=1)
    await WorkerRegistry(redis, keys).beat(info, ttl_s=3600)
    await redis.xgroup_create(keys.requests(name), "workers", id="0", mkstream=True)
    await redis.aclose()


async def idle_streams(url: str, model: str, count: int, gateway: psutil.Process) -> tuple[int, int]:
    """Opens `count` streams that get their first chunk and then wait; returns how many opened
    and the gateway's RSS while all are open."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    opened = 0
    all_open = asyncio.Event()
    release = asyncio.Event()
    limits = httpx.Limits(max_connections=count + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def one() -> None:
            nonlocal opened
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        opened += 1
                        if opened == count:
                            all_open.set()
                        break
                await release.wait()  # hold the connection open, idle

        tasks = [asyncio.create_task(one()) for _ in range(count)]
        await asyncio.wait_for(all_open.wait(), 300)
        await asyncio.sleep(1.0)
        rss = gateway.memory_info().rss
        release.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    return opened, rss


def baseline_rss() -> int:
    """RSS of a Python that has imported torch and transformers, and nothing else."""
    code = "import torch, transformers, psutil; print(psutil.Process().memory_info().rss)"
    return int(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    )


def accounted(settings: Settings) -> dict[str, int]:
    """What the worker's RSS should hold by construction: weights, KV cache, attention mask."""
    from safetensors import safe_open
    from transformers import AutoConfig

    from workers.hf_engine import kv_bytes_per_token
    from workers.loading import choose_dtype, resolve_model_path

    path = Path(resolve_model_path(settings.model, settings.home))
    dtype = choose_dtype(settings.dtype, "cpu")
    with safe_open(path / "model.safetensors", "pt") as weights:
        params = sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())  # noqa: SIM118
    kv_tokens, batch_tokens = settings.kv_cache_tokens, settings.max_batch_tokens or 1024
    return {
        f"weights ({params / 1e6:.0f}M params, {str(dtype).removeprefix('torch.')})": params * dtype.itemsize,
        f"KV cache ({kv_tokens} tokens)": kv_tokens
        * kv_bytes_per_token(AutoConfig.from_pretrained(path), dtype),
        f"attention mask ({batch_tokens} × {kv_tokens + batch_tokens})": (
            batch_tokens * (kv_tokens + batch_tokens) * dtype.itemsize
        ),
        "python, torch, transformers": baseline_rss(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--idle", type=int, default=500)
    parser.add_argument("--port", type=int, default=8077)
    args = parser.parse_args()

    settings = Settings().with_overrides(
        port=args.port, max_batch=args.streams, kv_cache_tokens=32768, max_backlog=args.idle + 100
    )
    if not settings.redis_url:
        settings = settings.with_overrides(redis_url="redis://127.0.0.1:6379/0")
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    processes, url = start_stack(settings, prefix)
    gateway, worker = (psutil.Process(p.pid) for p in processes)
    try:
        gateway_start, worker_ready = gateway.memory_info().rss, worker.memory_info().rss
        with PeakRSS(worker.pid) as peak:
            chunks = asyncio.run(active_streams(url, settings.model_name, args.streams, args.tokens))
        asyncio.run(stalled_model(settings, prefix, "stalled"))
        opened, gateway_idle = asyncio.run(idle_streams(url, "stalled", args.idle, gateway))
    finally:
        for p in processes:
            p.terminate()
        for p in processes:
            p.wait(timeout=30)

    print(f"\nworker  ({settings.model}, KV cache {settings.kv_cache_tokens} tokens)")
    parts = accounted(settings)
    for part, size in parts.items():
        print(f"  {part:<38} {size / MIB:8.0f} MiB")
    print(f"  {'  sum of the above':<38} {sum(parts.values()) / MIB:8.0f} MiB")
    print(f"  after load and warm-up        {worker_ready / MIB:8.0f} MiB")
    print(f"  peak, {args.streams} active streams       {peak.peak / MIB:8.0f} MiB   ({chunks} chunks)")
    print("gateway")
    print(f"  at start                      {gateway_start / MIB:8.0f} MiB")
    print(
        f"  {opened} idle SSE connections     {gateway_idle / MIB:8.0f} MiB   "
        f"({(gateway_idle - gateway_start) / max(opened, 1) / 1024:.1f} KiB each)"
    )


if __name__ == "__main__":
    main()
