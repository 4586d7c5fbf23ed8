"""Quantization benchmark: memory and decode speed of the built-in model (SmolLM2-135M-Instruct)
in fp32, bf16, 8-bit and 4-bit (bitsandbytes NF4) on this machine's CPU (or GPU with --device).

Each variant runs in its own process (clean peak RSS) through the worker's own engine
(transformers' continuous batching): the weights' footprint, the process's peak RSS, the
tokens/s of one greedy stream, and of --batch streams decoded together; the first request
(cache set-up) is not timed. A variant the machine cannot run (bf16 without native support is
emulated, slow but runs) is reported with its error.

    python bench/quant.py
    python bench/quant.py --variants fp32 int8 --tokens 128 --batch 8 --threads 2
    python bench/quant.py --plot quant.png                 # and a chart of memory against speed
    python bench/quant.py --from-json results.json --plot quant.png   # chart earlier results
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VARIANTS = {
    "fp32": {"dtype": "float32"},
    "bf16": {"dtype": "bfloat16"},
    "int8": {"dtype": "float32", "load_8bit": True},
    "nf4": {"dtype": "float32", "load_4bit": True},
}
PROMPT = "Write a short story about a lighthouse keeper."


async def decode(engine, tokenizer, streams: int, tokens: int, tag: str) -> float:
    """Tokens/s of `streams` greedy requests of `tokens` tokens each, run together."""
    from workers.engine import SamplingParams

    messages = [{"role": "user", "content": PROMPT}]
    ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))
    params = SamplingParams(temperature=0, max_new_tokens=tokens, ignore_eos=True)
    left = {f"{tag}-{i}" for i in range(streams)}
    started = time.perf_counter()
    for request_id in left:
        engine.add(request_id, ids, params)
    produced = 0
    while left:
        for out in await engine.step(timeout_s=120):
            produced += len(out.new_token_ids)
            if out.finished:
                left.discard(out.request_id)
    return produced / (time.perf_counter() - started)


async def measure(variant: str, args) -> dict:
    import torch

    from broker.settings import Settings
    from workers.hf_engine import TransformersEngine
    from workers.loading import load_model

    options = VARIANTS[variant]
    loaded = load_model(args.model, Settings().home, device=args.device, threads=args.threads, **options)
    engine = TransformersEngine(loaded, max_batch=args.batch, kv_cache_tokens=args.batch * 1024)
    engine.start()
    try:
        await decode(engine, loaded.tokenizer, 1, 8, "warmup")
        single = await decode(engine, loaded.tokenizer, 1, args.tokens, "single")
        batched = await decode(engine, loaded.tokenizer, args.batch, args.tokens, "batch")
    finally:
        engine.stop()
    return {
        "variant": variant,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "weights_mib": loaded.model.get_memory_footprint() / 2**20,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "single_tok_s": single,
        "batch_tok_s": batched,
        "batch": args.batch,
        "tokens": args.tokens,
        "threads": torch.get_num_threads(),
        "device": loaded.device,
    }


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per stream")
    parser.add_argument("--batch", type=int, default=8, help="streams decoded together")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # run one variant in this process
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--from-json", type=Path, help="print (and plot) results written by --json")
    parser.add_argument("--plot", type=Path, help="a PNG of weights' memory and tokens/s per variant")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(asyncio.run(measure(args.one, args))))
        return
    rows = json.loads(args.from_json.read_text()) if args.from_json else run_all(args)
    report(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if args.plot:
        plot([r for r in rows if "error" not in r], args.plot)


def run_all(args) -> list[dict]:
    rows = []
    for variant in args.variants:
        command = [
            sys.executable,
            __file__,
            "--one",
            variant,
            "--model",
            args.model,
            "--device",
            args.device,
            "--threads",
            str(args.threads),
            "--tokens",
            str(args.tokens),
            "--batch",
            str(args.batch),
        ]
        print(f"{variant}: running…", file=sys.stderr, flush=True)
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            rows.append({"variant": variant, "error": done.stderr.strip().splitlines()[-1]})
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def report(rows: list[dict]) -> None:
    print(
        f"{'variant':8} {'dtype':9} {'weights MiB':>11} {'peak RSS MiB':>12} {'1 stream tok/s':>14} "
        f"{'batch tok/s':>12}"
    )
    for row in rows:
        if "error" in row:
            print(f"{row['variant']:8} error: {row['error']}")
            continue
        print(
            f"{row['variant']:8} {row['dtype']:9} {row['weights_mib']:11.0f} {row['peak_rss_mib']:12.0f} "
            f"{row['single_tok_s']:14.1f} {row['batch_tok_s']:12.1f}"
        )
    if rows and "batch" in rows[0]:
        print(
            f"({rows[0]['tokens']} tokens per stream; batch = {rows[0]['batch']} streams; "
            f"{rows[0]['threads']} threads)"
        )


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    figure, (memory, speed) = plt.subplots(1, 2, figsize=(10, 4))
    memory.bar(names, [r["weights_mib"] for r in rows], color="tab:blue")
    memory.set_title("weights (MiB)")
    x = range(len(rows))
    speed.bar([i - 0.2 for i in x], [r["single_tok_s"] for r in rows], width=0.4, label="1 stream")
    batch = f"{rows[0]['batch']} streams"
    speed.bar([i + 0.2 for i in x], [r["batch_tok_s"] for r in rows], width=0.4, label=batch)
    speed.set_xticks(list(x), names)
    speed.set_title("decode tokens/s")
    speed.legend()
    figure.suptitle(f"SmolLM2-135M-Instruct on {rows[0].get('device', 'cpu')}, {rows[0]['threads']} threads")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
