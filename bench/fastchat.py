"""Corral against FastChat 0.2.36, side by side on this machine: same model, same prompts, same
chat format, same thread count, greedy, both streamed through their OpenAI-compatible servers.

FastChat runs as its users run it (controller + model_worker + openai_api_server, default
flags) from a virtual environment of its own with the versions it works with (transformers
4.46.3, pydantic 1); this script builds that environment on first use under
CORRAL_HOME/bench/fastchat-venv (a few minutes), and a copy of the model folder whose config
transformers 4 reads (the weights are linked, not copied).

Each round sends `concurrency` requests at once to one server, then the same ones to the other.
Tokens are counted by re-tokenizing each answer with the model's tokenizer, the same way for
both; answers are compared, since both run greedy on the same weights.

    python bench/fastchat.py                         # concurrency 1 and 16, 64 tokens
    python bench/fastchat.py --concurrency 16 --rounds 3
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
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.serve import TOPICS, start_stack
from broker.settings import Settings

FASTCHAT = [
    "torch==2.13.0",
    "fschat[model_worker]==0.2.36",
    "transformers==4.46.3",
    "accelerate==1.1.1",
    "pydantic<2",
    "fastapi==0.109.2",
]
# FastChat's ChatML template with the system message taken from the request; with the system
# message below both servers build byte-identical prompts (SmolLM2's template puts this same
# message in when a conversation has none).
CONV_TEMPLATE = "orca-2"
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def messages(i: int) -> list[dict]:
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"Write a long story about {TOPICS[i % len(TOPICS)]}."},
    ]


# --------------------------------------------------------------------------- FastChat set-up


def fastchat_python(home: Path) -> str:
    venv = home / "bench" / "fastchat-venv"
    python = venv / "bin" / "python"
    ready = venv / ".installed"
    if not ready.exists():
        print(f"building FastChat's environment in {venv} (once) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", FASTCHAT[0]], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *FASTCHAT[1:]], check=True)
        ready.touch()
    return str(python)


def fastchat_model_folder(model_path: Path, home: Path) -> Path:
    """The model folder as transformers 4 reads it: rope_theta at the top level of the config
    (transformers 5 nests it) and the fast tokenizer class named."""
    folder = home / "bench" / f"fastchat-model-{model_path.name}"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "tokenizer.json", "generation_config.json"):
        link = folder / name
        if not link.exists():
            link.symlink_to(model_path / name)
    config = json.loads((model_path / "config.json").read_text())
    rope = config.pop("rope_parameters", None) or {}
    config["rope_theta"] = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    config["torch_dtype"] = config.pop("dtype", "float32")
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    tokenizer = json.loads((model_path / "tokenizer_config.json").read_text())
    tokenizer["tokenizer_class"] = "PreTrainedTokenizerFast"
    tokenizer.pop("backend", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer, indent=1))
    return folder


def start_fastchat(
    python: str, folder: Path, name: str, threads: int, dtype: str, port: int
) -> list[subprocess.Popen]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    controller_port, worker_port = port + 1, port + 2
    controller = f"http://127.0.0.1:{controller_port}"
    # FastChat writes its logs into the working directory: keep them out of the checkout.
    logs = folder.parent / "fastchat-logs"
    logs.mkdir(exist_ok=True)
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env, "cwd": logs}
    commands = [
        ["fastchat.serve.controller", "--host", "127.0.0.1", "--port", str(controller_port)],
        [
            "fastchat.serve.model_worker",
            "--model-path",
            str(folder),
            "--model-names",
            name,
            "--device",
            "cpu",
            "--dtype",
            dtype,
            "--conv-template",
            CONV_TEMPLATE,
            "--host",
            "127.0.0.1",
            "--port",
            str(worker_port),
            "--worker-address",
            f"http://127.0.0.1:{worker_port}",
            "--controller-address",
            controller,
        ],
        [
            "fastchat.serve.openai_api_server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--controller-address",
            controller,
        ],
    ]
    processes = []
    for command in commands:
        processes.append(subprocess.Popen([python, "-m", *command], **quiet))
        time.sleep(3 if command is commands[0] else 0)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).json()["data"]:
                return processes
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(1)
    raise TimeoutError("FastChat did not come up")


# --------------------------------------------------------------------------- driving


async def stream_chat(client: httpx.AsyncClient, model: str, i: int, max_tokens: int) -> tuple[float, str]:
    body = {
        "model": model,
        "messages": messages(i),
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    start = time.perf_counter()
    ttft, text = None, ""
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            delta = choices[0].get("delta", {}).get("content")
            if delta:
                ttft = ttft or time.perf_counter() - start
                text += delta
    return ttft or 0.0, text


async def compare(args: argparse.Namespace, servers: dict[str, tuple[str, str]], tokenizer) -> list[dict]:
    rows = []
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    clients = {
        name: httpx.AsyncClient(base_url=url, timeout=1800, limits=limits)
        for name, (url, _) in servers.items()
    }
    try:
        for name, (_, model) in servers.items():  # warm-up
            await stream_chat(clients[name], model, 0, 4)
        for c in args.concurrency:
            seen = {name: {"ttft": [], "tokens": 0, "wall": 0.0, "texts": []} for name in servers}
            for r in range(args.rounds):
                for name, (_, model) in servers.items():
                    start = time.perf_counter()
                    done = await asyncio.gather(
                        *(stream_chat(clients[name], model, r * c + i, args.max_tokens) for i in range(c))
                    )
                    seen[name]["wall"] += time.perf_counter() - start
                    seen[name]["ttft"] += [ttft for ttft, _ in done]
                    seen[name]["texts"] += [text for _, text in done]
                    seen[name]["tokens"] += sum(len(tokenizer.encode(text)) for _, text in done)
            same = sum(a == b for a, b in zip(*(s["texts"] for s in seen.values()), strict=True))
            for name, s in seen.items():
                rows.append(
                    {
                        "server": name,
                        "concurrency": c,
                        "requests": len(s["texts"]),
                        "tokens": s["tokens"],
                        "tokens_per_s": s["tokens"] / s["wall"],
                        "ttft_p50_ms": statistics.median(s["ttft"]) * 1000,
                        "same_text": same,
                    }
                )
                row = rows[-1]
                print(
                    f"{name:>8}  c={c:<3} {row['tokens']:>5} tok  {row['tokens_per_s']:7.1f} tok/s  "
                    f"TTFT p50 {row['ttft_p50_ms']:8.1f} ms",
                    flush=True,
                )
            print(f"          identical answers: {same}/{len(s['texts'])}", flush=True)
    finally:
        for client in clients.values():
            await client.aclose()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="model threads, both servers")
    parser.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="both servers; auto: what Corral picks on this CPU",
    )
    parser.add_argument("--port", type=int, default=8077, help="Corral's port; FastChat uses the next three")
    parser.add_argument("--out", default="bench/results/fastchat.json")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from workers.loading import choose_dtype, resolve_model_path

    dtype = str(choose_dtype(args.dtype, "cpu")).removeprefix("torch.")
    settings = Settings().with_overrides(
        port=args.port,
        threads=args.threads,
        dtype=dtype,
        max_batch=max(16, *args.concurrency),
        kv_cache_tokens=32768,
    )
    if not settings.redis_url:
        settings = settings.with_overrides(redis_url="redis://127.0.0.1:6379/0")
    model_path = Path(resolve_model_path(settings.model, settings.home))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    python = fastchat_python(settings.home)
    folder = fastchat_model_folder(model_path, settings.home)
    print(
        f"model {settings.model} in {dtype}, {args.threads} thread(s), {args.max_tokens} tokens a request",
        flush=True,
    )

    processes = start_fastchat(python, folder, settings.model_name, args.threads, dtype, args.port + 1)
    try:
        corral, url = start_stack(settings, f"bench-{uuid.uuid4().hex[:8]}")
        processes += corral
        servers = {
            "FastChat": (f"http://127.0.0.1:{args.port + 1}", settings.model_name),
            "Corral": (url, settings.model_name),
        }
        rows = asyncio.run(compare(args, servers, tokenizer))
    finally:
        for p in processes:
            p.terminate()
        for p in processes:
            p.wait(timeout=30)

    print("\nconcurrency  Corral/FastChat tok/s")
    for c in args.concurrency:
        by = {r["server"]: r for r in rows if r["concurrency"] == c}
        print(f"{c:>11}  {by['Corral']['tokens_per_s'] / by['FastChat']['tokens_per_s']:>21.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
