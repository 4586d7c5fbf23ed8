"""Supervised fine-tuning examples: token ids and labels where exactly the assistant tokens (and
each assistant turn's end-of-turn token) carry loss, for any chat template.

The spans come from the template itself: for each assistant message the conversation is rendered
up to it (with the generation prompt) and through it; the text in between is the assistant's.
Each piece is tokenized on its own and the pieces concatenated, the way TRL tokenizes a prompt
and its completion: the prompt's tokens then end exactly where they end at inference, and no BPE
merge can straddle a boundary (a tokenizer that splits "\n\n" from "\n\nHello" differently
would otherwise shift every label). When a template does not render a shorter conversation as a
prefix of the longer one (it rewrites earlier turns), the conversation is rejected as
`template_mismatch` and counted, never trained with a wrong mask. FastChat instead computes
string offsets for the templates it knows and warns "tokenization mismatch" while it masks the
whole sample.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


class Skipped(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=generation_prompt, tokenize=False
        )
    except Exception as e:  # the template's own refusal: an empty conversation, a role it rejects
        raise Skipped("unrenderable", f"{type(e).__name__}: {e}") from None


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _is_blank(tokenizer, token_id: int) -> bool:
    return not tokenizer.decode([token_id]).strip()


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[list[int], list[tuple[int, int]]]:
    """The conversation's token ids and the [start, end) span of each assistant message, its
    end-of-turn token included and whitespace after it left out."""
    full = _render(tokenizer, messages, generation_prompt=False)
    ids: list[int] = []
    spans = []
    done = 0  # characters of `full` tokenized so far
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True)
        through = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not (full.startswith(through) and through.startswith(before)) or len(before) < done:
            raise Skipped("template_mismatch", f"message {i} does not render as a prefix of the rest")
        ids += _ids(tokenizer, full[done : len(before)])
        answer = _ids(tokenizer, full[len(before) : len(through)])
        end = len(answer)
        while end > 1 and _is_blank(tokenizer, answer[end - 1]):
            end -= 1
        spans.append((len(ids), len(ids) + end))
        ids += answer
        done = len(through)
    ids += _ids(tokenizer, full[done:])
    return ids, spans


def tokenize(tokenizer, messages: list[dict], max_length: int, too_long: str = "truncate") -> Example:
    """One conversation as an Example; raises Skipped with the reason when it cannot be one."""
    if not any(m["role"] == "assistant" for m in messages):
        raise Skipped("no_assistant_turn")
    ids, spans = assistant_spans(tokenizer, messages)
    labels = [IGNORE] * len(ids)
    for start, end in spans:
        labels[start:end] = ids[start:end]
    if len(ids) > max_length:
        if too_long == "skip":
            raise Skipped("too_long", f"{len(ids)} tokens > {max_length}")
        if all(label == IGNORE for label in labels[:max_length]):
            raise Skipped("too_long", f"no assistant token within the first {max_length} tokens")
        return Example(ids[:max_length], labels[:max_length], truncated=True)
    return Example(ids, labels)


@dataclass
class Tokenized:
    examples: list[Example] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    truncated: int = 0

    def summary(self) -> dict:
        return {
            "examples": len(self.examples),
            "skipped": dict(self.skipped),
            "truncated": self.truncated,
            "tokens": sum(len(e.input_ids) for e in self.examples),
            "trained_tokens": sum(e.trained_tokens for e in self.examples),
        }


def tokenize_all(
    tokenizer, conversations: Iterable[list[dict]], max_length: int, too_long: str = "truncate"
) -> Tokenized:
    out = Tokenized()
    for messages in conversations:
        try:
            example = tokenize(tokenizer, messages, max_length, too_long)
        except Skipped as e:
            out.skipped[e.reason] += 1
            continue
        out.truncated += int(example.truncated)
        out.examples.append(example)
    return out


def batches(examples: list[Example], pad_id: int) -> Iterator[dict]:
    """Right-padded batches (for evaluation outside the Trainer)."""
    width = max(len(e.input_ids) for e in examples)
    yield {
        "input_ids": [e.input_ids + [pad_id] * (width - len(e.input_ids)) for e in examples],
        "labels": [e.labels + [IGNORE] * (width - len(e.labels)) for e in examples],
        "attention_mask": [[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in examples],
    }
