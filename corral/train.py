"""`corral train`: supervised fine-tuning in the foreground with a progress bar, or as a queued
job on the GPU job queue (`--queue`)."""

from __future__ import annotations

import argparse
import threading
from pathlib import Path
from typing import get_args

import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from broker.jobs import TrainParams
from broker.settings import Settings
from corral.clean import queue_job

# Every option of TrainParams, documented (a test checks that none is missing).
HELP = {
    "model": "base model: built-in name, local folder or hub id (default smollm2-135m-instruct)",
    "data": "training conversations: ShareGPT, OpenAI messages or Alpaca; .json or .jsonl (repeatable)",
    "eval_data": "held-out conversations for the eval loss (repeatable)",
    "eval_ratio": "share of --data held out for evaluation when no --eval-data is given (default 0)",
    "method": "full fine-tuning, LoRA, or QLoRA (4-bit base, CUDA only) (default full)",
    "lora_r": "LoRA rank (default 8)",
    "lora_alpha": "LoRA alpha (default 16)",
    "lora_dropout": "LoRA dropout (default 0.05)",
    "lora_target_modules": "module names LoRA adapts, comma-separated (default: every linear layer)",
    "merge_lora": "merge LoRA into the base for the output folder (default true; false saves the adapter)",
    "epochs": "passes over the data (default 3)",
    "max_steps": "optimizer steps; overrides --epochs when > 0",
    "learning_rate": "peak learning rate (default 2e-5 full, 2e-4 LoRA)",
    "lr_scheduler": "learning-rate schedule after warmup (default cosine)",
    "warmup_ratio": "share of steps spent warming up (default 0.03)",
    "weight_decay": "AdamW weight decay (default 0)",
    "batch_size": "sequences per device step (default 2)",
    "global_batch_size": "sequences per optimizer step, reached by gradient accumulation "
    "(default: up to 128, about 16 steps an epoch)",
    "max_length": "tokens per sequence (default 2048)",
    "too_long": "longer conversations: truncate (kept if an assistant token remains) or skip",
    "packing": "pack sequences into one row per batch with position ids (padding-free)",
    "gradient_checkpointing": "recompute activations in the backward pass to save memory",
    "dtype": "training precision (default auto: bf16/fp16 on a GPU, fp32 on a CPU)",
    "save_steps": "save a checkpoint every N steps; a stopped or killed run resumes from the newest",
    "save_total_limit": "checkpoints kept (default 2)",
    "seed": "seed for shuffling, the eval split and initialisation",
    "chat_template": "Jinja file (or text) for a tokenizer without a chat template",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_parser(commands) -> None:
    train = commands.add_parser(
        "train",
        help="fine-tune a chat model (full, LoRA, QLoRA) on conversations",
        description="Supervised fine-tuning where exactly the assistant tokens carry loss, for any "
        "chat template. Writes checkpoints, config.json, data.json and model/ (a folder `corral "
        "worker --model` serves, with a model card) to --output.",
    )
    train.add_argument("-o", "--output", help="output folder; a run there resumes from its newest checkpoint")
    train.add_argument("--queue", action="store_true", help="run it as a queued job on the GPU job queue")
    train.add_argument("--config", help="a YAML file of these options (flags override it)")
    for name, field in TrainParams.model_fields.items():
        flag, annotation = _flag(name), field.annotation
        if annotation is bool:
            train.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=HELP[name])
        elif name in ("data", "eval_data"):
            train.add_argument(flag, action="append", help=HELP[name])
        elif choices := [c for c in get_args(annotation) if isinstance(c, str)]:
            train.add_argument(flag, choices=choices, help=HELP[name])
        elif name == "lora_target_modules":
            train.add_argument(flag, help=HELP[name])
        else:
            kinds = [t for t in (int, float) if t is annotation or t in get_args(annotation)]
            train.add_argument(flag, type=kinds[0] if kinds else str, help=HELP[name])


def params_from(args: argparse.Namespace) -> TrainParams:
    fields: dict = yaml.safe_load(Path(args.config).read_text()) if args.config else {}
    for name in TrainParams.model_fields:
        value = getattr(args, name, None)
        if value is not None:
            fields[name] = value.split(",") if name == "lora_target_modules" else value
    return TrainParams.model_validate(fields)


def run_train(args: argparse.Namespace, settings: Settings) -> int:
    console = Console()
    params = params_from(args)
    params = params.model_copy(
        update={
            "data": [str(Path(p).resolve()) for p in params.data],
            "eval_data": [str(Path(p).resolve()) for p in params.eval_data],
        }
    )
    if args.queue:
        return queue_job("train", params, settings, console)
    if not args.output:
        console.print("[red]--output is needed (or --queue)[/red]")
        return 2
    from broker.jobs import JobAborted
    from pipelines.train import train_job
    from workers.loading import resolve_model_path

    stop = threading.Event()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("tokenizing", total=None)

        def progress(stage: str, done: int, total: int, message: str | None = None, metrics=None) -> None:
            bar.update(task, description=message or stage, completed=done, total=total or None)

        context = {"model_path": lambda name: resolve_model_path(name, settings.home)}
        try:
            result = train_job(params.model_dump(), Path(args.output), context, progress, stop)
        except (KeyboardInterrupt, JobAborted):
            console.print("[yellow]stopped; run the same command again to resume from the last checkpoint[/]")
            return 130
    console.print(f"trained {result['steps']} steps, final loss {result['final_loss']}; serve it with:")
    print(f"  corral worker --model {result['output']}")  # whole, unwrapped: to copy
    return 0
