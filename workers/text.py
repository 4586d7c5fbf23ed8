"""Turning token ids into text deltas: incremental detokenization and stop strings."""

from __future__ import annotations

from typing import Any

# What a byte-level tokenizer decodes an incomplete UTF-8 sequence to.
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Decodes a growing list of token ids into text deltas without re-decoding the whole text.

    It decodes a short window: the tokens already emitted in the previous call (`_prefix` to
    `_read`, for context, since many tokenizers render a token differently at the start of a
    string) plus the new ones, and emits what the new ones added. When the new text ends in an
    incomplete multi-byte character it emits nothing and waits for the next token."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) <= len(before) or after.endswith(_REPLACEMENT):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return after[len(before) :]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return after[len(before) :]


class StopStrings:
    """Cuts the output at the first stop string, holding back text while it could still be
    the start of one, so a client never sees part of a stop string."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string was reached)."""
        if not self.stops:
            return text, False
        buffer = self._held + text
        hits = [i for i in (buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._held = ""
            return buffer[: min(hits)], True
        keep = self._longest_partial_stop(buffer)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep], False

    def _longest_partial_stop(self, buffer: str) -> int:
        """Length of the longest tail of `buffer` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def hold(self, text: str) -> None:
        """Start with `text` held back (a request resumed by another worker)."""
        self._held = text
