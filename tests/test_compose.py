"""compose.yaml describes the whole stack (validated further with `docker-compose config`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

COMPOSE = Path(__file__).parent.parent / "compose.yaml"


def test_compose_runs_redis_with_aof_a_gateway_workers_a_job_runner_and_the_ui() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert "--appendonly" in services["redis"]["command"]
    assert services["gateway"]["command"][:2] == ["corral", "gateway"]
    assert services["gateway"]["ports"] == ["127.0.0.1:8000:8000"]  # the host's loopback only
    assert "--insecure" in services["gateway"]["command"]  # a container listens on 0.0.0.0
    assert "ports" not in services["redis"]
    for worker in ("worker-cpu", "worker-gpu"):
        assert services[worker]["command"][:2] == ["corral", "worker"]
        assert (
            services[worker]["environment"]["CORRAL_REDIS_URL"] == "${CORRAL_REDIS_URL:-redis://redis:6379/0}"
        )
        assert services[worker]["environment"]["CORRAL_JOBS_REDIS_URL"] == "redis://redis:6379/0"
        assert services[worker]["depends_on"]["redis"]["condition"] == "service_healthy"
        assert services[worker]["stop_grace_period"] == "40s"  # longer than the 30 s drain
    assert services["jobs"]["command"] == ["corral", "jobs"]
    assert services["jobs"]["volumes"] == ["corral-data:/data"]  # artifacts shared with the others
    ui = services["ui"]
    assert ui["command"][:2] == ["corral", "ui"] and ui["ports"] == ["127.0.0.1:8501:8501"]
    assert ui["environment"]["CORRAL_GATEWAY_URL"] == "http://gateway:8000"  # a client of the gateway only
    assert set(ui["environment"]) == {"CORRAL_GATEWAY_URL", "CORRAL_API_KEY"}  # no server secrets
    assert ui["depends_on"]["gateway"]["condition"] == "service_healthy"
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"


def test_docker_compose_accepts_the_file_with_every_profile(tmp_path) -> None:
    """The real parser (Debian's docker-compose 1.29; .ci/run installs it): an invalid file,
    a bad reference or an unknown key fails here, as it would for `docker compose up`."""
    if shutil.which("docker-compose") is None:
        pytest.fail("the compose test needs docker-compose (apt-get install docker-compose; .ci/run does)")
    result = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), *("--profile", "gpu", "--profile", "api"), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)["services"]
    assert {"redis", "gateway", "worker-cpu", "jobs", "ui", "worker-gpu", "worker-api"} <= set(resolved)
    assert resolved["worker-cpu"]["command"][-4:-2] == ["--profile", "concise"]  # two contestants


def test_the_cluster_profile_runs_six_cluster_nodes_that_the_stack_uses(tmp_path) -> None:
    """`--profile cluster`, with CORRAL_REDIS_URL naming the cluster: six cluster-enabled Valkey
    nodes, a one-shot container that joins them, and gateway, workers and job runner on it (the
    job queue on the single server)."""
    if shutil.which("docker-compose") is None:
        pytest.fail("the compose test needs docker-compose (apt-get install docker-compose; .ci/run does)")
    env = {"PATH": "/usr/bin:/bin", "CORRAL_REDIS_URL": "redis+cluster://valkey-1:6379"}
    result = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), "--profile", "cluster", "config"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)["services"]
    nodes = [f"valkey-{i}" for i in range(1, 7)]
    for node in nodes:
        command = resolved[node]["command"]
        assert command[command.index("--cluster-enabled") + 1] == "yes"
        assert resolved[node]["profiles"] == ["cluster"]
    create = resolved["cluster-create"]
    assert create["command"][:2] == ["corral", "cluster-create"]
    assert [n.split(":")[0] for n in create["command"][2:]] == nodes
    for service in ("gateway", "worker-cpu", "jobs"):
        environment = resolved[service]["environment"]
        assert environment["CORRAL_REDIS_URL"] == "redis+cluster://valkey-1:6379"
        assert environment["CORRAL_JOBS_REDIS_URL"] == "redis://redis:6379/0"
