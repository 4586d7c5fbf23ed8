"""Determinism and what batch invariance costs, with the transformers engine in-process.

For each dtype and with `--batch-invariant` off and on (each in a process of its own, since
invariance is installed into the model), it prints:
- tokens/s with 16 and with 1 greedy stream of `--tokens` tokens (`ignore_eos`);
- of 24 greedy requests sent together, how many texts differ from the same requests sent one
  at a time;
- whether one long prompt (past a KV page, so its prefix is shared from the second time on)
  sent 5 times in a row gives 5 equal texts and logprobs.

    python bench/determinism.py                          # bf16 and fp32, off and on
    python bench/determinism.py --dtypes bfloat16 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker.settings import Settings

TOPICS = [
    "hash tables", "the moon", "binary search", "rivers", "photosynthesis", "TCP", "jazz", "volcanoes",
    "prime numbers", "bread", "gravity", "chess", "Rome", "vaccines", "the ocean", "compilers",
    "bees", "glass", "rainbows", "Python", "mountains", "coffee", "electricity", "owls",
]  # fmt: skip


async def run(engine, prompts: list[list[int]], params) -> list[tuple[list[int], list[float]]]:
    from workers.engine import run_to_end

    return await run_to_end(engine, prompts, [params] * len(prompts))


async def measure(args) -> dict:
    from workers.engine import SamplingParams
    from workers.hf_engine import TransformersEngine
    from workers.loading import load_model

    settings = Settings()
    loaded = load_model(settings.model, settings.home, device="cpu", dtype=args.one[0], threads=args.threads)
    engine = TransformersEngine(loaded, max_batch=16, batch_invariant=args.one[1] == "on")
    template = loaded.tokenizer.apply_chat_template

    def chat(text: str) -> list[int]:
        return template([{"role": "user", "content": text}], add_generation_prompt=True, return_dict=False)

    prompts = [chat(f"Explain {topic} in two sentences.") for topic in TOPICS]
    long = chat(" ".join(f"Here is a note about {t}." for t in TOPICS * 4) + " Summarise the notes.")
    engine.start()
    try:
        result: dict = {"dtype": args.one[0], "batch_invariant": args.one[1]}
        stream = SamplingParams(temperature=0, max_new_tokens=args.tokens, ignore_eos=True)
        await run(engine, prompts[:2], stream)  # warm-up
        for streams in (16, 1):
            started = time.perf_counter()
            await run(engine, prompts[:streams], stream)
            result[f"tok_s_{streams}"] = round(streams * args.tokens / (time.perf_counter() - started), 1)
        greedy = SamplingParams(temperature=0, max_new_tokens=32, logprobs=0)
        together = await run(engine, prompts, greedy)
        alone = [(await run(engine, [p], greedy))[0] for p in prompts]
        result["differ_together_vs_alone"] = sum(a != b for a, b in zip(together, alone, strict=True))
        repeats = [(await run(engine, [long], greedy))[0] for _ in range(5)]
        result["long_prompt_tokens"] = len(long)
        result["repeats_equal"] = all(r == repeats[0] for r in repeats)
        return result
    finally:
        engine.stop()


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--tokens", type=int, default=64, help="tokens per stream in the throughput runs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--one", nargs=2, metavar=("DTYPE", "off|on"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(asyncio.run(measure(args))), flush=True)
        return
    rows = []
    for dtype in args.dtypes:
        for mode in ("off", "on"):
            command = [sys.executable, __file__, "--one", dtype, mode, "--tokens", str(args.tokens)]
            command += ["--threads", str(args.threads)]
            print(f"{dtype}, batch invariance {mode} ...", flush=True)
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    header = ("dtype", "invariant", "tok/s 16", "tok/s 1", "differ/24", "repeats equal")
    print("\n{:<9} {:<9} {:>9} {:>8} {:>9} {:>14}".format(*header))
    for row in rows:
        names = ("dtype", "batch_invariant", "tok_s_16", "tok_s_1", "differ_together_vs_alone")
        cells = [row[k] for k in names]
        print("{:<9} {:<9} {:>9} {:>8} {:>9} {!s:>14}".format(*cells, row["repeats_equal"]))
    by = {(r["dtype"], r["batch_invariant"]): r for r in rows}
    for dtype in args.dtypes:
        off, on = (by[dtype, m] for m in ("off", "on"))
        kept = [on[f"tok_s_{n}"] / off[f"tok_s_{n}"] for n in (16, 1)]
        print(f"{dtype}: invariance keeps {kept[0]:.2f}x of the tokens/s at 16 streams, {kept[1]:.2f}x at 1")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
