"""Fixtures: a real Redis, the real SmolLM2 model, and real gateway/worker processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis
import yaml

from broker.connection import connect_sync
from broker.keys import Keys

MODEL = "smollm2-135m-instruct"
REDIS_URL = os.environ.get("CORRAL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
# Converted models are cached here across test runs (the conversion takes about a minute).
HOME = Path(os.environ.get("CORRAL_TEST_HOME", Path("~/.corral").expanduser()))
HEARTBEAT_S = 0.2
WORKER_TTL_S = 1.0


@pytest.fixture(scope="session")
def redis_url() -> str:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as e:
        pytest.fail(f"tests need a Redis at {REDIS_URL} (set CORRAL_TEST_REDIS_URL): {e}")
    return REDIS_URL


@pytest.fixture(scope="session")
def cluster_url(tmp_path_factory) -> Iterator[str]:
    """A loopback 3-master + 3-replica Valkey cluster, for the session (tests/cluster.py)."""
    from tests.cluster import LocalCluster, free_port_run

    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"), free_port_run(6)).start()
    yield cluster.url
    cluster.stop()


def on_single_server_and_cluster(scope: str = "function"):  # type: ignore[no-untyped-def]
    """A `redis_url` fixture for a test module (`redis_url = on_single_server_and_cluster()`):
    each of its tests runs on the single server and on the session's 3-master cluster."""

    @pytest.fixture(scope=scope, params=["single", "cluster"], name="redis_url")  # type: ignore[call-overload]
    def redis_url(request: pytest.FixtureRequest, redis_url: str) -> str:
        return request.getfixturevalue("cluster_url") if request.param == "cluster" else redis_url

    return redis_url


@pytest.fixture
def key_prefix() -> str:
    """A key prefix of this test's own, so tests never see each other's keys."""
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def model_path() -> str:
    from workers.loading import resolve_model_path

    return resolve_model_path(MODEL, HOME)


@pytest.fixture(scope="session")
def tokenizer(model_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="session")
def greedy(model_path: str, tokenizer):
    """In-process greedy `generate` on the same model: the reference the served text must equal."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)  # the same thread count as the test workers: same float sums
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()

    def generate(messages: list[dict], max_new_tokens: int) -> tuple[str, list[int], list[int]]:
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False)
        new = out[0, len(prompt) :].tolist()
        return tokenizer.decode(new, skip_special_tokens=True), prompt, new

    return generate


def wait_until_ok(url: str, timeout_s: float = 60) -> None:
    """Polls `url` until it answers 200."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer 200 within {timeout_s:.0f}s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Stack:
    """A gateway and workers as real processes on one key prefix."""

    redis_url: str
    key_prefix: str
    port: int
    processes: list[subprocess.Popen] = field(default_factory=list)
    # The job queue's own Redis, for a stack on a cluster (arq needs a single server).
    jobs_redis_url: str | None = None
    _client: redis.Redis | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            CORRAL_REDIS_URL=self.redis_url,
            **({"CORRAL_JOBS_REDIS_URL": self.jobs_redis_url} if self.jobs_redis_url else {}),
            CORRAL_KEY_PREFIX=self.key_prefix,
            CORRAL_HOME=str(HOME),
            CORRAL_PORT=str(self.port),
            CORRAL_HEARTBEAT_S=str(HEARTBEAT_S),
            CORRAL_WORKER_TTL_S=str(WORKER_TTL_S),
            CORRAL_UNHEARD_GRACE_S=str(WORKER_TTL_S),
            CORRAL_THREADS="1",
            # What the `greedy` reference computes in; auto picks bf16 on CPUs with AMX.
            CORRAL_DTYPE="float32",
            CORRAL_MAX_BATCH="8",
            CORRAL_KV_CACHE_TOKENS="16384",
            # Jobs created over the API may read the packaged test data and pytest's temp folders.
            CORRAL_ALLOWED_PATHS=json.dumps([sysconfig.get_paths()["purelib"], tempfile.gettempdir()]),
        )
        env.update(extra)
        return env

    def start(self, component: str, **extra: str) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-m", component], env=self.env(**extra))
        self.processes.append(process)
        return process

    def start_worker(
        self, served_name: str = MODEL, worker_id: str | None = None, **env: str
    ) -> subprocess.Popen:
        worker_id = worker_id or f"w-{uuid.uuid4().hex[:6]}"
        process = self.start("workers", CORRAL_SERVED_NAME=served_name, CORRAL_WORKER_ID=worker_id, **env)
        process.worker_id = worker_id  # type: ignore[attr-defined]
        self.wait_for_worker(worker_id, process)
        return process

    def wait_for_worker(self, worker_id: str, process: subprocess.Popen, timeout_s: float = 180) -> None:
        client = self.redis()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"worker {worker_id} exited with {process.returncode}")
            if client.exists(Keys(self.key_prefix).worker(worker_id)):
                return
            time.sleep(0.1)
        raise TimeoutError(f"worker {worker_id} did not register")

    def start_gateway(self, **env: str) -> str:
        """Another gateway on the same Redis and prefix, with its own settings; its URL."""
        port = free_port()
        self.start("gateway", CORRAL_PORT=str(port), **env)
        url = f"http://127.0.0.1:{port}"
        self.wait_for_gateway(url=url)
        return url

    def wait_for_gateway(self, timeout_s: float = 60, url: str | None = None) -> None:
        wait_until_ok(f"{url or self.url}/readyz", timeout_s)

    def redis(self) -> redis.Redis:
        """A blocking client of the stack's Redis (a cluster client on a cluster)."""
        if self._client is None:
            self._client = connect_sync(self.redis_url)
        return self._client

    def worker_info(self, worker_id: str) -> dict[str, str]:
        return self.redis().hgetall(Keys(self.key_prefix).worker(worker_id))

    def served_models(self) -> list[str]:
        return [m["id"] for m in httpx.get(f"{self.url}/v1/models", timeout=5).json()["data"]]

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture(scope="module")
def stack(redis_url: str, model_path: str) -> Iterator[Stack]:
    """One gateway and one worker of SmolLM2, shared by a test module (its job queue on the
    single server: arq cannot use a cluster)."""
    stack = Stack(redis_url, f"test-{uuid.uuid4().hex[:10]}", free_port(), jobs_redis_url=REDIS_URL)
    try:
        stack.start("gateway")
        stack.wait_for_gateway()
        stack.main_worker = stack.start_worker()  # type: ignore[attr-defined]
        yield stack
    finally:
        stack.stop()


TWIN = "smollm2-twin"
MODEL_INFO = {
    "display_name": "SmolLM2 135M Instruct",
    "organization": "HuggingFace (SmolLM2)",
    "license": "Apache-2.0",
    "link": "https://huggingface.co/HuggingFaceTB",
}
TWIN_FLAGS = {"display_name": "SmolLM2 Twin", "organization": "Corral tests", "model_license": "Apache-2.0"}
TWIN_INFO = {"display_name": "SmolLM2 Twin", "organization": "Corral tests", "license": "Apache-2.0"}


@pytest.fixture(scope="session")
def arena_stack(redis_url: str, model_path: str, tmp_path_factory) -> Iterator[Stack]:
    """The arena's stack: a gateway, two workers (SmolLM2 under two names, so anonymous battles
    have two models to draw) and a job runner, with a home of their own for job artifacts."""
    stack = Stack(redis_url, f"test-{uuid.uuid4().hex[:10]}", free_port())
    home = str(tmp_path_factory.mktemp("arena-home"))
    try:
        stack.start("gateway", CORRAL_HOME=home, CORRAL_RATINGS_BOOTSTRAP_ROUNDS="20")
        stack.wait_for_gateway()
        small = {"CORRAL_MAX_BATCH": "4", "CORRAL_KV_CACHE_TOKENS": "8192"}
        # Model metadata, one from a YAML file and one from flags (settings).
        info = Path(home) / "models.yaml"
        info.write_text(yaml.safe_dump({MODEL: MODEL_INFO}))
        stack.start_worker(CORRAL_MODEL_INFO_FILE=str(info), **small)
        flags = {f"CORRAL_{k.upper()}": v for k, v in TWIN_FLAGS.items()}
        stack.start_worker(served_name=TWIN, **flags, **small)
        stack.runner_log = Path(home) / "runner.log"  # type: ignore[attr-defined]
        runner = subprocess.Popen(
            [sys.executable, "-m", "corral", "jobs"],
            env=stack.env(CORRAL_HOME=home, CORRAL_RATINGS_BOOTSTRAP_ROUNDS="20"),
            stdout=stack.runner_log.open("w"),  # type: ignore[attr-defined]
            stderr=subprocess.STDOUT,
        )
        stack.processes.append(runner)
        yield stack
    finally:
        stack.stop()


# --------------------------------------------------------------------------- LoRA adapters

PROMPTS = ["What is the capital of France?", "Name a fruit.", "Count to five."]
LORA_TOKENS = 12
# Which layers each adapter changes: different sets, so a layer one adapter leaves alone is covered.
TARGETS = {"tuned": ["q_proj", "v_proj"], "other": ["k_proj", "o_proj", "down_proj"]}


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    messages = [{"role": "user", "content": prompt}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))


@pytest.fixture(scope="module")
def adapters(model_path: str, tmp_path_factory) -> dict[str, Path]:
    """Two adapters with random (not identity) weights, saved in peft's format."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    folders: dict[str, Path] = {}
    for name, targets in TARGETS.items():
        config = LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False)
        model = get_peft_model(base, config)
        with torch.no_grad():
            for parameter_name, parameter in model.named_parameters():
                if "lora_B" in parameter_name:
                    parameter.mul_(0.5)  # a clear change of the answers, not noise
        folders[name] = tmp_path_factory.mktemp("lora") / name
        model.save_pretrained(folders[name])
        base = model.unload()  # the base weights, without this adapter
    return folders


@pytest.fixture(scope="module")
def reference(model_path: str, adapters: dict[str, Path], tokenizer):
    """peft's own answers: (adapter or "" for the base, prompt) → (greedy token ids, first-step log-probs)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapters["tuned"], adapter_name="tuned")
    model.load_adapter(adapters["other"], adapter_name="other")
    model.eval()

    def answer(adapter: str, prompt: str) -> tuple[list[int], torch.Tensor]:
        ids = prompt_ids(tokenizer, prompt)
        inputs = torch.tensor([ids])
        with torch.no_grad():
            if adapter:
                model.set_adapter(adapter)
                out = model.generate(inputs, max_new_tokens=LORA_TOKENS, do_sample=False)
                logits = model(inputs).logits[0, -1]
            else:
                with model.disable_adapter():
                    out = model.generate(inputs, max_new_tokens=LORA_TOKENS, do_sample=False)
                    logits = model(inputs).logits[0, -1]
        return out[0, len(ids) :].tolist(), torch.log_softmax(logits.float(), dim=-1)

    return answer


# --------------------------------------------------------------------------- test tiers

# Tests that start processes or load a model to serve (`make test` runs them; `make test-fast`
# leaves them out): by the fixtures they use, and by module for those that start their own.
_SLOW_FIXTURES = {"stack", "arena_stack", "jobs_stack", "greedy", "bf16_engine", "adapters"}
_SLOW_MODULES = {
    "test_cluster",
    "test_sentinel",
    "test_cli",
    "test_ui",
    "test_reliability",
    "test_worker_health",
    "test_security",
    "test_train",
    "test_lora",
    "test_gptq",
    "test_quantized",
    "test_fallback",
    "test_gpu_placement",
    "test_schemathesis",
    "test_upstream",
    "test_serving",
    "test_openai_api",
    "test_api_contract",
    "test_arena",
    "test_jobs",
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: starts processes or serves a model (not in make test-fast)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        if module in _SLOW_MODULES or _SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)
