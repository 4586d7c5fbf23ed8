"""What structured outputs cost, with the transformers engine in-process (the built-in model,
the default dtype, one thread):

- tokens/s at concurrency 1 and 16 (a closed loop: a request that ends is replaced at once)
  for free requests, json_schema requests and a half-and-half mix. The prompts and schemas are
  tests/schemas.py's; each free request generates exactly as many tokens as the same prompt's
  JSON answer (`ignore_eos`), so the two differ only by the mask;
- schema compile time (the first request with a schema), p50 and p95, and a cached one's;
- time to first token of a request whose schema is cached, minus a free request's (p50).

    python bench/structured.py [--duration 15] [--json bench/results/structured.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker.settings import Settings
from broker.structured import check_schema, grammar_of
from tests.schemas import SCHEMAS


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def closed_loop(
    engine, jobs: list[tuple[list[int], object]], concurrency: int, duration_s: float
) -> float:
    """Tokens/s while `concurrency` requests are always in flight, drawn from `jobs` in turn."""
    started = time.monotonic()
    tokens, added, live = 0, 0, set()

    def add() -> None:
        nonlocal added
        prompt, params = jobs[added % len(jobs)]
        name = f"bench-{uuid.uuid4().hex[:12]}"
        engine.add(name, prompt, params)
        live.add(name)
        added += 1

    for _ in range(concurrency):
        add()
    while time.monotonic() - started < duration_s:
        for out in await engine.step(5):
            if out.request_id not in live:
                continue
            tokens += len(out.new_token_ids)
            if out.finished:
                live.discard(out.request_id)
                add()
    elapsed = time.monotonic() - started
    for name in live:
        engine.cancel(name)
    await asyncio.sleep(0.5)
    await engine.step(0.1)
    return tokens / elapsed


async def first_token_s(engine, prompt: list[int], params) -> float:
    started = time.monotonic()
    name = f"ttft-{uuid.uuid4().hex[:12]}"
    engine.add(name, prompt, params)
    first = None
    while True:
        for out in await engine.step(5):
            if out.request_id != name:
                continue  # a cancelled request's last output
            if first is None and out.new_token_ids:
                first = time.monotonic() - started
            if out.finished:
                assert first is not None
                return first


async def measure(args) -> dict:
    from workers.engine import SamplingParams, run_to_end
    from workers.grammar import Grammars
    from workers.hf_engine import TransformersEngine
    from workers.loading import eos_ids, load_model

    settings = Settings()
    loaded = load_model(settings.model, settings.home, device="cpu", dtype=args.dtype, threads=1)
    tokenizer = loaded.tokenizer
    schemas = [check_schema(schema) for _, schema, _ in SCHEMAS]
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, return_dict=False
        )
        for _, _, p in SCHEMAS
    ]
    result: dict = {"dtype": args.dtype, "schemas": len(SCHEMAS)}

    # Compile times: a fresh cache per pass (the llguidance tokenizer is built once, at start).
    grammars = Grammars(tokenizer, int(loaded.model.config.vocab_size), eos_ids(loaded))
    grammars.matcher(schemas[0])
    cold, warm = [], []
    for _ in range(3):
        grammars._compiled.clear()
        for text in schemas:
            started = time.perf_counter()
            grammars.matcher(text)
            cold.append(1000 * (time.perf_counter() - started))
            started = time.perf_counter()
            grammars.matcher(text)
            warm.append(1000 * (time.perf_counter() - started))
    result["compile_ms"] = {"p50": round(statistics.median(cold), 2), "p95": round(percentile(cold, 0.95), 2)}
    result["cached_matcher_ms_p50"] = round(statistics.median(warm), 3)

    engine = TransformersEngine(loaded, max_batch=16)
    engine.start()
    try:
        constrained = [
            SamplingParams(temperature=0, max_new_tokens=400, grammar=grammar_of(text)) for text in schemas
        ]
        answers = await run_to_end(engine, prompts, constrained)  # also fills the schema cache
        lengths = [len(tokens) for tokens, _ in answers]
        result["json_answer_tokens_mean"] = round(statistics.mean(lengths), 1)
        free = [SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True) for n in lengths]
        kinds = {
            "free": list(zip(prompts, free, strict=True)),
            "json_schema": list(zip(prompts, constrained, strict=True)),
            "mix": [
                (p, c if i % 2 else f)
                for i, (p, c, f) in enumerate(zip(prompts, constrained, free, strict=True))
            ],
        }
        for concurrency in (1, 16):
            row = {}
            for kind, jobs in kinds.items():
                duration = args.duration if concurrency > 1 else args.duration / 2
                row[kind] = round(await closed_loop(engine, jobs, concurrency, duration), 1)
                print(f"concurrency {concurrency:2}, {kind:11}: {row[kind]:7.1f} tokens/s", flush=True)
            row["json_schema_vs_free"] = round(row["json_schema"] / row["free"], 3)
            row["mix_vs_free"] = round(row["mix"] / row["free"], 3)
            result[f"tokens_per_s_concurrency_{concurrency}"] = row
        extra = []
        for prompt, json_params, free_params in list(zip(prompts, constrained, free, strict=True))[:12]:
            with_schema = await first_token_s(engine, prompt, json_params)
            without = await first_token_s(engine, prompt, free_params)
            extra.append(1000 * (with_schema - without))
        result["ttft_extra_ms_cached_schema"] = {
            "p50": round(statistics.median(extra), 2),
            "runs": len(extra),
        }
    finally:
        engine.stop()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per run at concurrency 16")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    result = asyncio.run(measure(args))
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
