"""Where an in-flight request stands, as a worker records it for another one to continue.

One string per request, which the worker APPENDs to with each publish: re-writing everything
generated so far every step would cost O(length) per token, O(length²) per answer, and one
APPEND is one command on the worker's hot path. Entries are

    index@start:id,id,...|seq,sent,done;

a choice's new token ids from position `start` on, then its state after them (last event seq,
characters of text published, 1 once it has ended). An entry says where its tokens go, so an
append that is repeated (a pipeline resent after a connection dropped mid-way) changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

# How long a request's progress outlives its deadline, for a late reclaim to find it finished.
GRACE_MS = 60_000


@dataclass(frozen=True)
class ChoiceProgress:
    seq: int
    sent: int  # characters of text published
    done: bool
    tokens: list[int]


def entry(index: int, start: int, new_tokens: list[int], seq: int, sent: int, done: bool) -> str:
    return f"{index}@{start}:{','.join(map(str, new_tokens))}|{seq},{sent},{int(done)};"


@dataclass
class ProgressUpdate:
    """One request's entries for one publish; `expire_at_ms` is set on its first write."""

    entries: str = ""
    expire_at_ms: int | None = None


def parse(log: str | None) -> dict[int, ChoiceProgress]:
    """Each recorded choice's progress, by index."""
    tokens: dict[int, list[int]] = {}
    states: dict[int, tuple[int, int, bool]] = {}
    for item in (log or "").split(";"):
        if not item:
            continue
        where, _, rest = item.partition(":")
        ids, _, state = rest.partition("|")
        index, _, start = where.partition("@")
        have = tokens.setdefault(int(index), [])
        del have[int(start) :]  # a repeated append overwrites itself
        have += [int(t) for t in ids.split(",") if t]
        seq, sent, done = state.split(",")
        states[int(index)] = (int(seq), int(sent), done == "1")
    return {i: ChoiceProgress(*states[i], tokens[i]) for i in states}
