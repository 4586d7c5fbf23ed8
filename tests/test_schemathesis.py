"""schemathesis fuzzes every operation in the gateway's own OpenAPI schema: no input gets a 5xx."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import Stack


def test_no_generated_request_gets_a_server_error(arena_stack: Stack) -> None:
    # Two served models, so that the arena's operations run for real (with one, an anonymous
    # battle is rightly a 503 `not_enough_models`).
    stack = arena_stack
    command = [
        # The script pip installed beside this interpreter (the venv's bin is not always on PATH).
        str(Path(sys.executable).parent / "schemathesis"),
        "run",
        f"{stack.url}/openapi.json",
        "--checks",
        "not_a_server_error",
        "--max-examples",
        "40",
        "--generation-deterministic",
        "--request-timeout",
        "60",
        "--workers",
        "1",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=580)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "generated" in result.stdout and " 0 generated" not in result.stdout
