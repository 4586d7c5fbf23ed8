"""Conversations in and out: streaming readers for JSON arrays and JSONL, the ShareGPT form every
step works on, and converters from and to Alpaca and OpenAI `messages`.

Readers hold one record at a time, so memory stays flat on large files. A record that cannot
be read is never skipped in silence: it comes out as a `Rejected` with its reason and where it
was (file, record number, byte offset or line), and the run goes on where it can: after a bad
JSONL line, with the next line; after a file cut off mid-record, the complete records before
the cut are all kept and the cut is reported.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# ShareGPT's speaker names, and OpenAI's roles for them.
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
_SPEAKERS = {
    "user": "human",
    "assistant": "gpt",
    "system": "system",
    "human": "human",
    "gpt": "gpt",
    "bard": "gpt",
    "bing": "gpt",
    "chatgpt": "gpt",
}
_CHUNK_BYTES = 1 << 20


@dataclass
class Rejected:
    """A record taken out of the run, with why and where."""

    reason: str
    where: str
    record: Any = None
    detail: str = ""

    def to_json(self) -> dict:
        return {"reason": self.reason, "where": self.where, "detail": self.detail, "record": self.record}


# --------------------------------------------------------------------------- reading


def read(path: Path) -> Iterator[tuple[str, Any] | Rejected]:
    """(where, raw record) for every record of a .json array or a .jsonl file, or Rejected."""
    with open(path, "rb") as head:
        first = head.read(64).lstrip()
    if first.startswith(b"["):
        yield from _read_array(path)
    else:
        yield from _read_lines(path)


def _read_lines(path: Path) -> Iterator[tuple[str, Any] | Rejected]:
    with open(path, encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path.name}:line {number}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield Rejected("invalid_json", where, line[:200], f"{e.msg} at column {e.colno}")


def _read_array(path: Path) -> Iterator[tuple[str, Any] | Rejected]:
    """Elements of a top-level JSON array, decoded one at a time from a growing buffer."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8", errors="replace") as text:
        buffer, consumed, at, index = text.read(_CHUNK_BYTES), 0, 0, 0
        at = buffer.index("[") + 1
        eof = False
        while True:
            at = _skip(buffer, at, ", \n\r\t")
            if at >= len(buffer) and not eof:
                buffer, consumed, at, eof = _refill(text, buffer, consumed, at)
                continue
            if at < len(buffer) and buffer[at] == "]":
                return
            where = f"{path.name}:record {index} (char {consumed + at})"
            try:
                record, end = decoder.raw_decode(buffer, at)
            except json.JSONDecodeError as e:
                if not eof:  # maybe the record runs past the buffer: read more and try again
                    buffer, consumed, at, eof = _refill(text, buffer, consumed, at)
                    continue
                left = len(buffer) - at
                # The decoder ran into the end of the file: an unterminated string (reported
                # where it starts), or any error at the very end.
                if e.msg.startswith("Unterminated string") or e.pos >= len(buffer.rstrip()):
                    yield Rejected(
                        "truncated", where, None, f"the file ends inside this record ({left} chars)"
                    )
                else:
                    yield Rejected(
                        "invalid_json",
                        where,
                        buffer[at : at + 200],
                        f"{e.msg}; the rest of the file ({left} chars) is unread",
                    )
                return
            yield where, record
            index += 1
            at = end


def _skip(buffer: str, at: int, chars: str) -> int:
    while at < len(buffer) and buffer[at] in chars:
        at += 1
    return at


def _refill(text, buffer: str, consumed: int, at: int) -> tuple[str, int, int, bool]:
    """Drop what is decoded, append the next chunk; (buffer, consumed, at, eof)."""
    more = text.read(_CHUNK_BYTES)
    return buffer[at:] + more, consumed + at, 0, not more


# --------------------------------------------------------------------------- normal form


class NotAConversation(ValueError):
    """A record of no known shape, or of the wrong types; str(e) says what is wrong."""


def normalize(raw: Any, fallback_id: str) -> dict:
    """The ShareGPT form: {"id", "conversations": [{"from": human|gpt|system, "value"}], ...}.
    Accepts ShareGPT, OpenAI `messages` and Alpaca records; other fields are kept."""
    if not isinstance(raw, dict):
        raise NotAConversation(f"a record must be an object, not {type(raw).__name__}")
    if "conversations" in raw:
        turns = raw["conversations"]
        record = dict(raw)
    elif "messages" in raw:
        turns = [_from_message(m) for m in _list(raw["messages"], "messages")]
        record = {k: v for k, v in raw.items() if k != "messages"}
    elif "instruction" in raw and "output" in raw:
        return from_alpaca(raw, fallback_id)
    else:
        raise NotAConversation("no conversations, messages or instruction/output field")
    record["conversations"] = [_turn(t) for t in _list(turns, "conversations")]
    record["id"] = str(raw.get("id", fallback_id))
    return record


def _list(value: Any, name: str) -> list:
    if not isinstance(value, list):
        raise NotAConversation(f"{name} must be a list, not {type(value).__name__}")
    return value


def _from_message(message: Any) -> dict:
    if not isinstance(message, dict):
        raise NotAConversation(f"a message must be an object, not {type(message).__name__}")
    return {"from": message.get("role"), "value": message.get("content")}


def _turn(turn: Any) -> dict:
    if not isinstance(turn, dict):
        raise NotAConversation(f"a turn must be an object, not {type(turn).__name__}")
    speaker, value = turn.get("from"), turn.get("value")
    if not isinstance(speaker, str) or speaker.lower() not in _SPEAKERS:
        raise NotAConversation(f"unknown speaker {speaker!r}")
    if not isinstance(value, str):
        raise NotAConversation(f"a turn's value must be text, not {type(value).__name__}")
    return {"from": _SPEAKERS[speaker.lower()], "value": value}


def from_alpaca(raw: dict, fallback_id: str) -> dict:
    """Alpaca's instruction (+ input) → one human turn, output → one gpt turn."""
    parts = [raw.get("instruction"), raw.get("input"), raw.get("output")]
    if not all(isinstance(p, str) for p in parts if p is not None):
        raise NotAConversation("alpaca fields must be text")
    question = raw["instruction"] + (f"\n\n{raw['input']}" if raw.get("input") else "")
    return {
        "id": str(raw.get("id", fallback_id)),
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": raw["output"]}],
    }


def to_openai(record: dict) -> dict:
    """A ShareGPT record as OpenAI `messages`; other fields are kept."""
    out = {k: v for k, v in record.items() if k != "conversations"}
    out["messages"] = [{"role": ROLES[t["from"]], "content": t["value"]} for t in record["conversations"]]
    return out


def write_jsonl(path: Path, records) -> int:
    """Writes records one a line to `path` (atomically: a temporary file renamed at the end)."""
    partial = path.with_name(path.name + ".partial")
    count = 0
    with open(partial, "w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    partial.replace(path)
    return count
