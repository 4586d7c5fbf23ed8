"""Supervised fine-tuning (full, LoRA, QLoRA) on transformers' Trainer, as a job that resumes.

The Trainer brings what FastChat's train.py also leans on (schedules, gradient accumulation and
checkpointing, mixed precision, FSDP/DeepSpeed through accelerate, checkpoints with optimizer
and RNG state). Corral adds the labels (pipelines/sft.py), progress and abort through a
callback, resume from the newest checkpoint in the job's folder, and an output folder a worker
serves as it is: LoRA merged into its base, the tokenizer beside it, and a model card.
"""

from __future__ import annotations

import json
import logging
import math
import random
import threading
import time
import warnings
from pathlib import Path

from transformers import PrinterCallback, TrainerCallback

from broker.jobs import JobAborted, Progress, TrainParams
from pipelines import records
from pipelines.sft import Example, Tokenized, tokenize_all


def conversations(paths: list[str]) -> tuple[list[list[dict]], int]:
    """OpenAI-style messages of every conversation in `paths` (ShareGPT, OpenAI or Alpaca records,
    JSON or JSONL), and how many records were not conversations."""
    out, bad = [], 0
    for path in paths:
        for item in records.read(Path(path)):
            if isinstance(item, records.Rejected):
                bad += 1
                continue
            position, raw = item
            try:
                out.append(records.to_openai(records.normalize(raw, position))["messages"])
            except records.NotAConversation:
                bad += 1
    return out, bad


def split(items: list, ratio: float, seed: int) -> tuple[list, list]:
    if not ratio:
        return items, []
    shuffled = items[:]
    random.Random(seed).shuffle(shuffled)
    cut = max(1, int(len(shuffled) * ratio))
    return shuffled[cut:], shuffled[:cut]


def global_batch(config: TrainParams, examples: int) -> tuple[int, int]:
    """(per-device batch, gradient accumulation). FastChat trains Vicuna with 128 sequences a
    step; a small dataset gets fewer, so that an epoch still has about 16 optimizer steps."""
    wanted = config.global_batch_size or max(1, min(128, examples // 16))
    per_device = min(config.batch_size, wanted)
    return per_device, max(1, math.ceil(wanted / per_device))


def latest_checkpoint(folder: Path) -> Path | None:
    found = [p for p in (folder / "checkpoints").glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return max(found, key=lambda p: int(p.name.split("-")[1]), default=None)


class _Dataset:
    def __init__(self, examples: list[Example]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        e = self.examples[i]
        return {"input_ids": e.input_ids, "labels": e.labels}


def _collator(pad_id: int, packing: bool):
    """Right padding with labels -100 and an attention mask; with packing, each batch is one
    row with position ids restarting per example (transformers' DataCollatorWithFlattening)."""
    import torch
    from transformers import DataCollatorWithFlattening

    if packing:
        return DataCollatorWithFlattening()

    def collate(batch: list[dict]) -> dict:
        width = max(len(b["input_ids"]) for b in batch)
        rows = [(b, width - len(b["input_ids"])) for b in batch]
        return {
            "input_ids": torch.tensor([b["input_ids"] + [pad_id] * n for b, n in rows]),
            "labels": torch.tensor([b["labels"] + [-100] * n for b, n in rows]),
            "attention_mask": torch.tensor([[1] * len(b["input_ids"]) + [0] * n for b, n in rows]),
        }

    return collate


def _dtype(config: TrainParams):
    import torch

    if config.dtype != "auto":
        return getattr(torch, config.dtype)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # CPU: bf16 autocast trains, but fp32 is the safe default


def _load_model(config: TrainParams, model_path: str):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"dtype": _dtype(config)}
    if config.method == "qlora":
        if not torch.cuda.is_available():
            raise ValueError("qlora needs a CUDA GPU (bitsandbytes 4-bit training); use lora on a CPU")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=kwargs["dtype"]
        )
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    if config.method == "full":
        return model
    # peft imports bitsandbytes, whose CPU backend logs a warning when it cannot fetch optional
    # kernels from the hub (never reachable here; LoRA does not use them).
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if config.method == "qlora":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.gradient_checkpointing
        )
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_target_modules or "all-linear",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft (0.21) reads the attribute transformers 5 renamed; the warning is theirs to fix.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, lora)


def _tokenizer(model_path: str, chat_template: str | None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if chat_template:
        path = Path(chat_template)
        tokenizer.chat_template = path.read_text() if path.exists() else chat_template
    if tokenizer.chat_template is None:
        raise ValueError("the tokenizer has no chat template; pass chat_template (a Jinja file)")
    if tokenizer.pad_token is None:  # Llama-3 and others ship none; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def train_job(params: dict, folder: Path, context: dict, progress: Progress, stop: threading.Event) -> dict:
    """The `train` job: tokenize, train (resuming from the newest checkpoint), save, describe."""
    config = TrainParams.model_validate(params)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(config.model_dump_json(indent=2))
    model_path = context["model_path"](config.model)
    tokenizer = _tokenizer(model_path, config.chat_template)

    progress("tokenize", 0, 0)
    data, bad = conversations(config.data)
    held_out = conversations(config.eval_data)[0] if config.eval_data else []
    if not held_out:
        data, held_out = split(data, config.eval_ratio, config.seed)
    train_set = tokenize_all(tokenizer, data, config.max_length, config.too_long)
    eval_set = tokenize_all(tokenizer, held_out, config.max_length, config.too_long)
    if not train_set.examples:
        raise ValueError(f"no trainable conversation in {config.data}: {train_set.summary()}")
    progress("tokenize", len(data), len(data))
    (folder / "data.json").write_text(
        json.dumps(
            {"train": train_set.summary(), "eval": eval_set.summary(), "not_conversations": bad}, indent=2
        )
    )

    trainer = _trainer(config, folder, model_path, tokenizer, train_set, eval_set, progress, stop)
    resume = latest_checkpoint(folder)
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if stop.is_set():
        _keep_finished_steps(trainer, folder)
        raise JobAborted()
    metrics = trainer.evaluate() if eval_set.examples else {}
    output = _save(config, folder, trainer, tokenizer, model_path)
    summary = {
        "output": str(output),
        "steps": trainer.state.global_step,
        "train_loss": round(result.training_loss, 4),
        "final_loss": _last_loss(trainer),
        "eval_loss": metrics.get("eval_loss"),
        "resumed_from_step": int(resume.name.split("-")[1]) if resume else 0,
        "tokens_seen": trainer.state.num_input_tokens_seen,
        "runtime_s": round(result.metrics["train_runtime"], 2),
        "train": train_set.summary(),
        "eval": eval_set.summary(),
    }
    if trainer.is_world_process_zero():
        _model_card(output, config, summary)
    return summary


def _trainer(
    config, folder, model_path, tokenizer, train_set: Tokenized, eval_set: Tokenized, progress, stop
):
    import torch
    from transformers import Trainer, TrainingArguments

    per_device, accumulation = global_batch(config, len(train_set.examples))
    dtype = _dtype(config)
    on_gpu = torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(folder / "checkpoints"),
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate or (2e-5 if config.method == "full" else 2e-4),
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,  # < 1: a ratio
        weight_decay=config.weight_decay,
        bf16=on_gpu and dtype == torch.bfloat16,
        fp16=on_gpu and dtype == torch.float16,
        activation_checkpointing=config.gradient_checkpointing,
        logging_steps=1,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        eval_strategy="no",
        report_to="none",
        use_cpu=not on_gpu,
        seed=config.seed,
        data_seed=config.seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
    )
    model = _load_model(config, model_path)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_Dataset(train_set.examples),
        eval_dataset=_Dataset(eval_set.examples) if eval_set.examples else None,
        data_collator=_collator(tokenizer.pad_token_id, config.packing),
        processing_class=tokenizer,
        callbacks=[_ProgressCallback(progress, stop)],
    )
    trainer.remove_callback(PrinterCallback)  # progress goes to the job, not stdout
    return trainer


def _keep_finished_steps(trainer, folder: Path) -> None:
    """After an abort that stopped mid-step: a checkpoint of the optimizer steps taken since the
    last one, so that a resumed job loses only the step that was cut short. (Trainer saves only
    from its own step end; `_save_checkpoint` is its own saver, unchanged from transformers 5.0.)"""
    latest = latest_checkpoint(folder)
    saved_step = int(latest.name.split("-")[1]) if latest else 0
    if trainer.state.global_step > saved_step:
        trainer._save_checkpoint(trainer.model, trial=None)


class _ProgressCallback(TrainerCallback):
    """Step, loss, learning rate, tokens/s and ETA to the job's progress; stop on abort, at the
    next micro-batch (a step of many micro-batches takes long on a CPU), keeping every finished
    step in a checkpoint."""

    def __init__(self, progress: Progress, stop: threading.Event) -> None:
        self.progress, self.stop = progress, stop
        self.started = time.monotonic()
        self.first_step = self.first_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.started, self.first_step = time.monotonic(), state.global_step
        self.first_tokens = state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop.is_set():
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_substep_end(self, args, state, control, **kwargs):
        if self.stop.is_set():  # its partial gradient is dropped; the steps before it are kept
            control.should_training_stop = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        steps = state.global_step - self.first_step
        elapsed = time.monotonic() - self.started
        # Tokens the model read (padding left out) since this run (or resume) began.
        rate = (state.num_input_tokens_seen - self.first_tokens) / elapsed if elapsed else 0.0
        eta = (state.max_steps - state.global_step) * elapsed / steps if steps else 0
        metrics = {
            "loss": round(logs["loss"], 4),
            "learning_rate": logs.get("learning_rate"),
            "tokens_per_s": round(rate, 1),
            "eta_s": round(eta),
        }
        message = (
            f"step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f} "
            f"lr {logs.get('learning_rate', 0):.2e} {rate:.0f} tok/s ETA {eta:.0f}s"
        )
        self.progress("train", state.global_step, state.max_steps, message=message, metrics=metrics)


def _last_loss(trainer) -> float | None:
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return round(losses[-1], 4) if losses else None


def _save(config: TrainParams, folder: Path, trainer, tokenizer, model_path: str) -> Path:
    """The servable folder: full weights (LoRA merged into its base), or the adapter alone with
    merge_lora false. Full weights go through the Trainer's save_model, which under FSDP or
    DeepSpeed ZeRO-3 gathers the shards on the main process (offloaded to CPU), never a whole
    copy per GPU."""
    output = folder / "model"
    if config.method == "full" or not config.merge_lora:
        trainer.save_model(str(output))  # the main process writes, the tokenizer included
        return output
    model = trainer.model
    if trainer.is_world_process_zero():
        if config.method == "qlora":  # merge into the full-precision base, not the 4-bit one
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            trainer.model.save_pretrained(folder / "adapter")
            base = AutoModelForCausalLM.from_pretrained(model_path, dtype=_dtype(config))
            model = PeftModel.from_pretrained(base, folder / "adapter")
        model.merge_and_unload().save_pretrained(output)
        tokenizer.save_pretrained(output)
    return output


def _model_card(output: Path, config: TrainParams, summary: dict) -> None:
    lines = [
        f"# {output.parent.name}",
        "",
        f"Fine-tuned by Corral from `{config.model}` ({config.method}"
        + (", merged" if config.method != "full" and config.merge_lora else "")
        + ").",
        "",
        f"- data: {', '.join(config.data)} ({summary['train']['examples']} conversations, "
        f"{summary['train']['trained_tokens']} assistant tokens trained)",
        f"- steps: {summary['steps']}, final training loss: {summary['final_loss']}",
        f"- eval loss: {summary['eval_loss']}" if summary["eval_loss"] is not None else "- eval: none",
        f"- serve it: `corral worker --model {output}`",
    ]
    (output / "README.md").write_text("\n".join(lines) + "\n")
