"""The gateway's per-request event stream: seq order, duplicates, and gaps that never fill."""

from __future__ import annotations

import asyncio

import pytest

from broker.schemas import Event, Usage
from gateway.hub import EventsLost, events


def raw(seq: int, text: str = "", index: int = 0, type_: str = "delta") -> str:
    usage = Usage(prompt_tokens=1, completion_tokens=seq) if type_ == "done" else None
    return Event(seq=seq, index=index, type=type_, text=text, usage=usage).model_dump_json()


async def collect(messages: list[str], choices: int = 1, gap_timeout_s: float = 5.0) -> list[Event]:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for message in messages:
        queue.put_nowait(message)
    deadline = asyncio.get_running_loop().time() + 10
    return [e async for e in events(queue, deadline, choices, gap_timeout_s)]


async def test_events_that_arrive_early_wait_for_the_missing_one() -> None:
    # Seq 2 was lost while the gateway resubscribed; the worker sends it again after seq 3.
    got = await collect([raw(1, "a"), raw(3, "c"), raw(2, "b"), raw(4, type_="done")])
    assert [(e.seq, e.text) for e in got] == [(1, "a"), (2, "b"), (3, "c"), (4, "")]


async def test_duplicates_are_dropped_per_choice() -> None:
    got = await collect(
        [raw(1, "a"), raw(1, "x", index=1), raw(1, "a"), raw(2, type_="done"), raw(2, type_="done", index=1)],
        choices=2,
    )
    assert [(e.index, e.seq) for e in got] == [(0, 1), (1, 1), (0, 2), (1, 2)]


async def test_a_gap_that_never_fills_raises_events_lost_not_text_with_a_hole() -> None:
    with pytest.raises(EventsLost):
        await collect([raw(1, "a"), raw(3, "c")], gap_timeout_s=0.2)
