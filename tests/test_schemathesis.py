"""schemathesis fuzzes every operation in the gateway's own OpenAPI schema: no input gets a 5xx."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import Stack


def test_no_generated_request_gets_a_server_error(arena_stack: Stack) -> None:
    # Two served models, so that the arena's operations run for real (with one, an anonymous
    # battle is rightly a 503 `not_enough_models`); a gateway with keys, called with an admin's,
    # so that every route is reached past its role check.
    home = arena_stack.runner_log.parent  # type: ignore[attr-defined]
    url = arena_stack.start_gateway(
        CORRAL_HOME=str(home), CORRAL_API_KEYS="fuzz-user", CORRAL_ADMIN_KEYS="fuzz-admin"
    )
    command = [
        # The script pip installed beside this interpreter (the venv's bin is not always on PATH).
        str(Path(sys.executable).parent / "schemathesis"),
        "run",
        f"{url}/openapi.json",
        "--header",
        "Authorization: Bearer fuzz-admin",
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
