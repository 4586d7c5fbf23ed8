"""Serving benchmark: the gateway path against the same engine called in-process, in one run.

Both paths run side by side in one process tree and take turns: each round sends `concurrency`
requests at once in-process, then the same requests through the gateway (same prompts,
temperature 0, exactly --max-tokens output tokens). Prints aggregate output tokens/s and time to
first token (p50/p95) for both paths, the tok/s ratio, and the TTFT overhead two ways: the
difference of the p50s, and the p50 of the per-request differences (request i through the
gateway minus request i in-process, same prompt, same round). Writes the figures as JSON.

    python bench/serve.py                       # concurrency 1, 4, 16 on the default model
    python bench/serve.py --concurrency 1 16 --max-tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker.settings import Settings

TOPICS = [
    "a lighthouse",
    "a lost key",
    "the moon",
    "a small robot",
    "an old map",
    "a jazz band",
    "rain",
    "a fox",
]


def prompt(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Write a short story about {TOPICS[i % len(TOPICS)]}."}]


@dataclass
class Result:
    path: str
    concurrency: int
    requests: int
    output_tokens: int
    wall_s: float
    ttft_p50_ms: float
    ttft_p95_ms: float

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s


def summarize(path: str, concurrency: int, ttfts: list[float], tokens: int, wall_s: float) -> Result:
    ttfts_ms = sorted(t * 1000 for t in ttfts)
    p95 = ttfts_ms[min(len(ttfts_ms) - 1, int(0.95 * len(ttfts_ms)))]
    return Result(path, concurrency, len(ttfts), tokens, wall_s, statistics.median(ttfts_ms), p95)


# --------------------------------------------------------------------------- in-process engine


class InProcess:
    """The worker's engine without Redis or HTTP: add a request, wait for its tokens."""

    def __init__(self, settings: Settings) -> None:
        from workers.hf_engine import TransformersEngine
        from workers.loading import load_model

        loaded = load_model(settings.model, settings.home, settings.device, settings.dtype, settings.threads)
        self.tokenizer = loaded.tokenizer
        self.engine = TransformersEngine(
            loaded, settings.max_batch, settings.kv_cache_tokens, settings.max_batch_tokens
        )
        self.waiting: dict[str, asyncio.Queue] = {}

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            for out in await self.engine.step(timeout_s=0.1):
                self.waiting[out.request_id].put_nowait(out)

    async def generate(self, messages: list[dict], max_tokens: int) -> tuple[float, int]:
        from workers.engine import SamplingParams

        start = time.perf_counter()
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        request_id = uuid.uuid4().hex
        self.waiting[request_id] = queue = asyncio.Queue()
        self.engine.add(
            request_id, ids, SamplingParams(temperature=0, max_new_tokens=max_tokens, ignore_eos=True)
        )
        ttft, tokens = None, 0
        while True:
            out = await queue.get()
            if out.new_token_ids and ttft is None:
                ttft = time.perf_counter() - start
            tokens += len(out.new_token_ids)
            if out.finished:
                del self.waiting[request_id]
                return ttft or 0.0, tokens


# --------------------------------------------------------------------------- gateway


async def gateway_generate(client: httpx.AsyncClient, model: str, messages: list[dict], max_tokens: int):
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - start
    return ttft or 0.0, tokens


def start_stack(settings: Settings, prefix: str) -> tuple[list[subprocess.Popen], str]:
    env = dict(os.environ)
    env.update({f"CORRAL_{k.upper()}": str(v) for k, v in settings.model_dump().items() if v is not None})
    env["CORRAL_KEY_PREFIX"] = prefix
    processes = [subprocess.Popen([sys.executable, "-m", c], env=env) for c in ("gateway", "workers")]
    url = f"http://{settings.host}:{settings.port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v1/models", timeout=1).json()["data"]:
                return processes, url
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(0.5)
    raise TimeoutError("the stack did not come up")


# --------------------------------------------------------------------------- driver


async def batch(
    generate, concurrency: int, first_prompt: int, max_tokens: int
) -> tuple[list[float], int, float]:
    """`concurrency` requests at once; their TTFTs (in prompt order), tokens and wall time."""
    start = time.perf_counter()
    done = await asyncio.gather(*(generate(prompt(first_prompt + c), max_tokens) for c in range(concurrency)))
    return [ttft for ttft, _ in done], sum(tokens for _, tokens in done), time.perf_counter() - start


async def bench(settings: Settings, args: argparse.Namespace) -> list[tuple[Result, Result, list[float]]]:
    """Both paths, interleaved round by round so that both see the same machine: this box's speed
    drifts by tens of percent over minutes, far more than the overhead being measured."""
    local = InProcess(settings)
    local.engine.start()
    stop = asyncio.Event()
    runner = asyncio.create_task(local.run(stop))
    processes, url = start_stack(settings, f"bench-{uuid.uuid4().hex[:8]}")
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    results = []
    try:
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

            async def remote(messages: list[dict], max_tokens: int):
                return await gateway_generate(client, settings.model_name, messages, max_tokens)

            paths = {"in-process": local.generate, "gateway": remote}
            for generate in paths.values():  # warm-up: first batches allocate caches
                await generate(prompt(0), 4)
            for c in args.concurrency:
                ttfts: dict[str, list[float]] = {name: [] for name in paths}
                tokens = dict.fromkeys(paths, 0)
                wall = dict.fromkeys(paths, 0.0)
                for r in range(max(args.rounds, -(-args.min_requests // c))):
                    for name, generate in paths.items():
                        round_ttfts, round_tokens, round_wall = await batch(
                            generate, c, r * c, args.max_tokens
                        )
                        ttfts[name] += round_ttfts
                        tokens[name] += round_tokens
                        wall[name] += round_wall
                a, b = (summarize(name, c, ttfts[name], tokens[name], wall[name]) for name in paths)
                paired = [(g - i) * 1000 for i, g in zip(ttfts["in-process"], ttfts["gateway"], strict=True)]
                results.append((a, b, paired))
                print(row(a), row(b), sep="\n", flush=True)
    finally:
        for p in processes:
            p.terminate()
        for p in processes:
            p.wait(timeout=30)
        stop.set()
        await runner
        local.engine.stop()
    return results


def row(r: Result) -> str:
    return (
        f"{r.path:>10}  c={r.concurrency:<3} {r.requests:>3} req  {r.output_tokens:>5} tok  "
        f"{r.tokens_per_s:7.1f} tok/s  TTFT p50 {r.ttft_p50_ms:7.1f} ms  p95 {r.ttft_p95_ms:7.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--rounds", type=int, default=2, help="rounds per concurrency (at least)")
    parser.add_argument(
        "--min-requests", type=int, default=16, help="requests per path per concurrency (at least)"
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="model threads, both paths (0: auto)")
    parser.add_argument("--port", type=int, default=8077)
    parser.add_argument("--out", default="bench/results/serve.json")
    args = parser.parse_args()

    settings = Settings().with_overrides(
        port=args.port, threads=args.threads, max_batch=max(args.concurrency), kv_cache_tokens=32768
    )
    if not settings.redis_url:
        settings = settings.with_overrides(redis_url="redis://127.0.0.1:6379/0")
    print(
        f"model {settings.model}, threads {settings.threads or 'auto'}, {args.max_tokens} tokens per request"
    )
    results = asyncio.run(bench(settings, args))

    print("\nconcurrency  gateway/in-process tok/s   TTFT p50 overhead   paired TTFT overhead p50")
    for a, b, paired in results:
        overhead = b.ttft_p50_ms - a.ttft_p50_ms
        print(
            f"{a.concurrency:>11}  {b.tokens_per_s / a.tokens_per_s:>24.3f}   {overhead:>+14.1f} ms"
            f"   {statistics.median(paired):>+21.1f} ms"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            [
                asdict(r)
                | {"tokens_per_s": r.tokens_per_s, "paired_ttft_overhead_p50_ms": statistics.median(p)}
                for a, b, p in results
                for r in (a, b)
            ],
            indent=2,
        )
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
