"""Fair prefill: how long decoding streams wait for a token while a long prompt is read in.

Eight short requests decode; once each has its first tokens, long prompts (a share of the
context, token ids) arrive one after another. Every decoding stream's token arrival times are
recorded while a long prompt is prefilled (from its arrival to its first token), and the run
prints the gaps between tokens (p50, p99, max) and each long prompt's time to first token, for
each bound on the prompt tokens one step may take while others decode (0 = no bound: the
behaviour before the bound existed). The engine runs in-process (no Redis, no HTTP): this
measures the scheduler, nothing else.

    python bench/prefill.py                          # bounds 0, 64, 128, 256
    python bench/prefill.py --bounds 0 256 --long-share 0.9 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker.settings import Settings


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def one_run(loaded, bound: int, args) -> dict:
    from workers.engine import SamplingParams
    from workers.hf_engine import TransformersEngine

    engine = TransformersEngine(
        loaded,
        max_batch=args.streams + 1,
        kv_cache_tokens=args.kv_cache_tokens,
        max_batch_tokens=args.max_batch_tokens,
        prefill_tokens_while_decoding=bound,
    )
    engine.start()
    arrivals: dict[str, list[float]] = {f"s{i}": [] for i in range(args.streams)}
    pending: dict[str, float] = {}
    try:
        tokenizer = loaded.tokenizer
        short = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Count from one to one thousand in words."}],
            add_generation_prompt=True,
            return_dict=False,
        )
        greedy = SamplingParams(temperature=0, max_new_tokens=100_000, ignore_eos=True)
        for name in arrivals:
            engine.add(name, list(short), greedy)
        long_len = int(loaded.context_length * args.long_share)
        vocab = engine.vocab_size
        windows: list[tuple[float, float]] = []
        ttfts: list[float] = []
        started = time.perf_counter()
        next_long = 0
        while len(ttfts) < args.long_prompts:
            for out in await engine.step(1.0):
                now = time.perf_counter()
                if out.request_id in arrivals and out.new_token_ids:
                    arrivals[out.request_id] += [now] * len(out.new_token_ids)
                elif out.request_id in pending and out.new_token_ids:
                    arrived = pending.pop(out.request_id)
                    ttfts.append(now - arrived)
                    windows.append((arrived, now))
                    engine.cancel(out.request_id)
            warm = all(len(times) >= 4 for times in arrivals.values())
            if warm and not pending and next_long < args.long_prompts:
                ids = [(1000 + 7 * (next_long * long_len + i)) % vocab for i in range(long_len)]
                name = f"long{next_long}"
                pending[name] = time.perf_counter()
                engine.add(name, ids, SamplingParams(temperature=0, max_new_tokens=1))
                next_long += 1
            if time.perf_counter() - started > args.timeout_s:
                raise TimeoutError("the long prompts did not finish in time")
        gaps = []
        for times in arrivals.values():
            for before, after in itertools.pairwise(times):
                if any(start <= after and before <= end for start, end in windows):
                    gaps.append(after - before)
        return {
            "bound": bound,
            "long_prompt_tokens": long_len,
            "gaps": len(gaps),
            "gap_p50_ms": 1000 * statistics.median(gaps),
            "gap_p99_ms": 1000 * percentile(gaps, 0.99),
            "gap_max_ms": 1000 * max(gaps),
            "long_ttft_s": [round(t, 2) for t in ttfts],
        }
    finally:
        for name in [*arrivals, *pending]:
            engine.cancel(name)
        engine.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bounds", type=int, nargs="+", default=[0, 64, 128, 256])
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--long-share", type=float, default=0.9, help="long prompt length / context")
    parser.add_argument("--long-prompts", type=int, default=2)
    parser.add_argument("--kv-cache-tokens", type=int, default=32768)
    parser.add_argument("--max-batch-tokens", type=int, default=0, help="0 = the CPU default (1024)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout-s", type=float, default=900)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from workers.loading import load_model

    settings = Settings()
    loaded = load_model(settings.model, settings.home, dtype=args.dtype, threads=args.threads)
    results = []
    for bound in args.bounds:
        result = await one_run(loaded, bound, args)
        results.append(result)
        r = result
        print(
            f"bound {bound}: gaps p50 {r['gap_p50_ms']:.0f} ms, p99 {r['gap_p99_ms']:.0f} ms, "
            f"max {r['gap_max_ms']:.0f} ms ({r['gaps']} gaps); long prompt of "
            f"{r['long_prompt_tokens']} tokens: TTFT {r['long_ttft_s']} s",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
