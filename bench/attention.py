"""What one layer's batch-invariant decode attention costs, beside the SDPA call transformers makes.

16 requests (SmolLM2-135M's heads: 9 query, 3 key/value, 64 wide) decode one token each against
90–135 keys, in bf16: torch's SDPA over the step with a block mask (what transformers runs
without invariance) and `workers.invariant.paged_attention` with each of its two cores. Prints
the median of `--rounds` rounds of `--calls` calls, in µs per layer.

    python bench/attention.py
    python bench/attention.py --threads 2 --requests 32
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workers import invariant

HEADS, KV_HEADS, DIM = 9, 3, 64


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lengths = [90 + 3 * i for i in range(args.requests)]
    total = sum(lengths)
    query = torch.randn(1, HEADS, args.requests, DIM, dtype=torch.bfloat16)
    key, value = (torch.randn(1, KV_HEADS, total, DIM, dtype=torch.bfloat16) for _ in range(2))
    cu_k = torch.tensor([0, *itertools.accumulate(lengths)])
    cu_q = torch.arange(args.requests + 1)
    mask = torch.full((args.requests, total), float("-inf"))
    for r in range(args.requests):
        mask[r, cu_k[r] : cu_k[r + 1]] = 0
    mask = mask.to(torch.bfloat16)[None, None]
    scale = DIM**-0.5

    def sdpa() -> None:
        F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=True)

    def invariant_with(core):
        def run() -> None:
            invariant._cores[("cpu", args.threads)] = core
            invariant.paged_attention(
                None,
                query,
                key,
                value,
                None,
                fallback=None,
                scaling=scale,
                cu_seq_lens_q=cu_q,
                cu_seq_lens_k=cu_k,
            )

        return run

    runs = {
        "sdpa (not invariant)": sdpa,
        "invariant, products": invariant_with(invariant._products),
        "invariant, elementwise": invariant_with(invariant._elementwise),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            run()
            started = time.perf_counter()
            for _ in range(args.calls):
                run()
            times[name].append((time.perf_counter() - started) / args.calls * 1e6)
    print(f"{args.requests} decoding requests, {min(lengths)}-{max(lengths)} keys, {args.threads} thread(s)")
    for name, values in times.items():
        print(f"{name:<24} {statistics.median(values):8.0f} µs per layer")


if __name__ == "__main__":
    main()
