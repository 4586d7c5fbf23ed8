"""What tests share besides fixtures: polls that always end."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable


async def until(condition: Callable[[], object | Awaitable[object]], what: str, timeout_s: float = 120,
                every_s: float = 0.05) -> None:  # fmt: skip
    """Polls `condition` (plain or async) until it is true; past `timeout_s`, fails naming `what`
    instead of waiting for ever."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s")
        await asyncio.sleep(every_s)
