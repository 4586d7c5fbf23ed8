"""Cleaning steps: each takes one conversation (ShareGPT form) and keeps it, changes it, splits
it, or drops it with a named reason. A registry maps step names to classes, so a pipeline is a
list of names (and parameters) given on the command line or in a YAML file."""

from __future__ import annotations

import hashlib
import random
import re
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Annotated, Any, ClassVar

import re2
from pydantic import BaseModel, ConfigDict, Field, field_validator


class Drop(Exception):
    """The record leaves the run: `reason` is the counted name, `detail` says more. `record`,
    when given, is the one that leaves instead of the one the step was given (a sample that
    takes the new record in place of an older one)."""

    def __init__(self, reason: str, detail: str = "", record: dict | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail
        self.record = record


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


def user_pattern(pattern: str, ignore_case: bool = False, multiline: bool = False):
    """A pattern someone else wrote, compiled by RE2: matching takes time linear in the text, so
    no pattern can freeze a run (Python's `re` backtracks: `(\\w+\\s?)+$` on a long line takes
    hours). Raises ValueError naming what RE2 does not support (backreferences, lookaround)."""
    flags = ("i" if ignore_case else "") + ("m" if multiline else "")
    try:
        return re2.compile(f"(?{flags}){pattern}" if flags else pattern)
    except re2.error as e:
        raise ValueError(
            f"not a supported pattern (RE2 syntax: no backreferences or lookaround): {e}"
        ) from None


class Step(ABC):
    """One cleaning step. `apply` returns the records that go on (usually the one it got; none
    while it holds the record back) or raises Drop; `finish` returns, at the end, the records it
    held back, or new ones when `adds` is set."""

    name: ClassVar[str]
    Params: ClassVar[type[Params]] = Params
    adds: ClassVar[bool] = False

    def __init__(self, params: Params, context: dict[str, Any]) -> None:
        self.params = params
        self.context = context

    @abstractmethod
    def apply(self, record: dict) -> list[dict]: ...

    def finish(self) -> list[dict]:
        return []

    def notes(self) -> dict[str, int]:
        """Counts worth reporting besides drops (turns trimmed, rounds left out, …)."""
        return {}


STEPS: dict[str, type[Step]] = {}


def step(cls: type[Step]) -> type[Step]:
    STEPS[cls.name] = cls
    return cls


def texts(record: dict, speaker: str | None = None) -> list[str]:
    return [t["value"] for t in record["conversations"] if speaker is None or t["from"] == speaker]


# --------------------------------------------------------------------------- format


@step
class HtmlToMarkdown(Step):
    """ShareGPT exports keep ChatGPT's HTML: turn it into Markdown, code blocks with their
    language, and drop the copy-button text the export leaves around code."""

    name = "html_to_markdown"
    _HTML = re.compile(r"<(div|p|pre|code|ol|ul|li|table|h[1-6]|br|strong|em|span)\b", re.IGNORECASE)
    _COPY_BUTTON = re.compile(r"^(\w[\w+#-]*)?Copy code\s*$", re.MULTILINE)

    def __init__(self, params: Params, context: dict[str, Any]) -> None:
        super().__init__(params, context)
        from bs4 import XMLParsedAsHTMLWarning

        # Chat text that merely looks like XML is still parsed as the HTML fragment it is.
        warnings.filterwarnings("ignore", category=XMLParsedAsHTMLWarning)

    def apply(self, record: dict) -> list[dict]:
        from markdownify import markdownify

        for turn in record["conversations"]:
            if self._HTML.search(turn["value"]):
                try:
                    markdown = markdownify(turn["value"], code_language_callback=_code_language)
                except Exception as e:  # markdownify raises whatever its parser hits
                    raise Drop("html_error", f"{type(e).__name__}: {e}") from None
                turn["value"] = self._COPY_BUTTON.sub("", markdown).strip()
        return [record]


def _code_language(element) -> str:
    """A code block's language from `class="language-x"` (or hljs's) on it or its <code>."""
    for node in (element, element.find("code")):
        for cls in (node.get("class") or []) if node is not None else []:
            if cls.startswith("language-"):
                return cls.removeprefix("language-")
    return ""


@step
class Roles(Step):
    """Turns alternate human, gpt, human, …, after at most one leading system turn. A trailing
    human turn (a question with no answer) is trimmed; any other disorder drops the record."""

    name = "roles"

    def __init__(self, params: Params, context: dict[str, Any]) -> None:
        super().__init__(params, context)
        self.trimmed = 0

    def apply(self, record: dict) -> list[dict]:
        turns = record["conversations"]
        body = turns[1:] if turns and turns[0]["from"] == "system" else turns
        if body and body[-1]["from"] == "human":
            body, turns = body[:-1], turns[:-1]
            self.trimmed += 1
        expected = ["human", "gpt"] * (len(body) // 2 + 1)
        for i, turn in enumerate(body):
            if turn["from"] != expected[i]:
                raise Drop("wrong_role_order", f"turn {i} is {turn['from']}, expected {expected[i]}")
        record["conversations"] = turns
        return [record]

    def notes(self) -> dict[str, int]:
        return {"trailing_question_trimmed": self.trimmed}


@step
class Malformed(Step):
    """Formatting broken by HTML conversion or truncation: unbalanced ``` fences, or numbered
    lists whose every item is `1.` (lost numbering)."""

    name = "malformed"
    _RESTARTED_LIST = re.compile(r"\n1\. [^\n]*\n(?:[^\n]*\n)?1\. ")

    def apply(self, record: dict) -> list[dict]:
        for value in texts(record):
            if value.count("```") % 2:
                raise Drop("malformed_format", "unbalanced ``` fence")
            if self._RESTARTED_LIST.search("\n" + value):
                raise Drop("malformed_format", "numbered list restarts at 1.")
        return [record]


# --------------------------------------------------------------------------- content


class TurnsParams(Params):
    turns: int = 2


@step
class MinTurns(Step):
    name = "min_turns"
    Params = TurnsParams

    def apply(self, record: dict) -> list[dict]:
        turns = [t for t in record["conversations"] if t["from"] != "system"]
        if len(turns) < self.params.turns:
            raise Drop("too_few_turns", f"{len(turns)} turns")
        return [record]


class WordsParams(Params):
    # Corral's default: names of other assistants and vendors that a model should not learn to
    # call itself, and refusals copied from them.
    words: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        ["openai", "chatgpt", "as an ai language model", "my knowledge cutoff"], max_length=1000
    )


@step
class BlockedWords(Step):
    name = "blocked_words"
    Params = WordsParams

    def __init__(self, params: WordsParams, context: dict[str, Any]) -> None:
        super().__init__(params, context)
        self.pattern = (
            user_pattern("|".join(re.escape(w.lower()) for w in params.words)) if params.words else None
        )

    def apply(self, record: dict) -> list[dict]:
        if self.pattern is not None:
            for value in texts(record):
                hit = self.pattern.search(value.lower())
                if hit:
                    raise Drop("blocked_word", hit.group(0))
        return [record]


class ErrorParams(Params):
    # Replies that are an error page or a rate limit, not an answer. RE2 syntax (no
    # backreferences or lookaround): the patterns come from whoever queues the job.
    patterns: list[Annotated[str, Field(min_length=1, max_length=500)]] = Field(
        [
            r"too many requests in 1 hour",
            r"^!?\s*(network error|something went wrong|an error occurred)",
            r"^error in (body )?stream",
            r"you've reached (the|our) (current )?usage cap",
            r"rate limit (reached|exceeded)",
        ],
        max_length=100,
    )

    @field_validator("patterns")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            user_pattern(pattern)
        return patterns


@step
class ErrorReplies(Step):
    name = "error_replies"
    Params = ErrorParams

    def __init__(self, params: ErrorParams, context: dict[str, Any]) -> None:
        super().__init__(params, context)
        self.patterns = [user_pattern(p, ignore_case=True, multiline=True) for p in params.patterns]

    def apply(self, record: dict) -> list[dict]:
        for value in texts(record, "gpt"):
            for pattern in self.patterns:
                if pattern.search(value.strip()):
                    raise Drop("error_reply", pattern.pattern)
        return [record]


class LengthParams(Params):
    min_chars: int = 16  # all text together
    min_reply_chars: int = 1  # every answer


@step
class MinLength(Step):
    name = "min_length"
    Params = LengthParams

    def apply(self, record: dict) -> list[dict]:
        total = sum(len(v.strip()) for v in texts(record))
        if total < self.params.min_chars:
            raise Drop("too_short", f"{total} characters")
        for value in texts(record, "gpt"):
            if len(value.strip()) < self.params.min_reply_chars:
                raise Drop("too_short", "an empty answer")
        return [record]


@step
class Dedupe(Step):
    """Exact duplicates of an earlier conversation (same turns, whitespace aside). Keeps one
    digest per kept record (16 bytes), not the records."""

    name = "dedupe"

    def __init__(self, params: Params, context: dict[str, Any]) -> None:
        super().__init__(params, context)
        self.seen: set[bytes] = set()

    def apply(self, record: dict) -> list[dict]:
        digest = hashlib.blake2b(digest_size=16)
        for turn in record["conversations"]:
            digest.update(turn["from"].encode() + b"\0" + " ".join(turn["value"].split()).encode() + b"\1")
        key = digest.digest()
        if key in self.seen:
            raise Drop("duplicate")
        self.seen.add(key)
        return [record]


class LanguageParams(Params):
    keep: list[str] | None = None  # ISO 639-1 codes; None = every language
    skip: list[str] = []


@step
class Language(Step):
    """Keeps or skips languages, detected on the human turns by py3langid."""

    name = "language"
    Params = LanguageParams

    def apply(self, record: dict) -> list[dict]:
        import py3langid

        text = " ".join(texts(record, "human"))[:2000]
        lang, _ = py3langid.classify(text)
        if (self.params.keep is not None and lang not in self.params.keep) or lang in self.params.skip:
            raise Drop("language", lang)
        record.setdefault("lang", lang)
        return [record]


# --------------------------------------------------------------------------- shape


class SplitParams(Params):
    max_tokens: int = 2048
    # A tokenizer folder or hub id; the CLI resolves Corral's model names (default: the built-in model).
    tokenizer: str | None = None


@step
class SplitLong(Step):
    """Splits a conversation into pieces of whole rounds (a human turn and its answer) that fit
    `max_tokens` with the target model's tokenizer and chat template. A round that cannot fit
    even alone is left out (counted); a conversation none of whose rounds fits is dropped."""

    name = "split_long"
    Params = SplitParams

    def __init__(self, params: SplitParams, context: dict[str, Any]) -> None:
        super().__init__(params, context)
        tokenizer = context["tokenizer"](params.tokenizer)
        self.count, self.fixed = _turn_counter(tokenizer)
        self.rounds_left_out = 0
        self.split = 0

    def apply(self, record: dict) -> list[dict]:
        turns = record["conversations"]
        system = turns[:1] if turns and turns[0]["from"] == "system" else []
        body = turns[len(system) :]
        costs = self.count(turns)  # one tokenizer call for the whole conversation
        budget = self.params.max_tokens - self.fixed - sum(costs[: len(system)])
        rounds = [body[i : i + 2] for i in range(0, len(body), 2)]
        round_costs = [sum(costs[len(system) + i : len(system) + i + 2]) for i in range(0, len(body), 2)]
        pieces: list[list[dict]] = []
        current: list[dict] = []
        used = 0
        for round_, cost in zip(rounds, round_costs, strict=True):
            if cost > budget:
                self.rounds_left_out += 1
                continue
            if used + cost > budget:
                pieces.append(current)
                current, used = [], 0
            current += round_
            used += cost
        if current:
            pieces.append(current)
        if not pieces:
            raise Drop("too_long", f"no round fits {self.params.max_tokens} tokens")
        self.split += len(pieces) > 1
        if len(pieces) == 1 and len(pieces[0]) == len(body):
            return [record]
        return [
            {**record, "id": f"{record['id']}_{i}", "conversations": system + piece}
            for i, piece in enumerate(pieces)
        ]

    def notes(self) -> dict[str, int]:
        return {"conversations_split": self.split, "rounds_left_out": self.rounds_left_out}


def _turn_counter(tokenizer) -> tuple[Callable[[list[dict]], list[int]], int]:
    """Tokens each turn takes in the chat template (its text plus the template's tokens around
    each turn), and the template's fixed tokens (a default system prompt, a leading BOS),
    measured once by rendering one round and two: rendering every candidate piece would cost a
    template call per round."""

    def rendered(rounds: int) -> int:
        turns = [{"role": r, "content": "x"} for _ in range(rounds) for r in ("user", "assistant")]
        return len(tokenizer.apply_chat_template(turns, tokenize=True, return_dict=False))

    x = len(tokenizer.encode("x", add_special_tokens=False))
    try:
        one, two = rendered(1), rendered(2)
        per_turn = -(-(two - one) // 2) - x  # rounded up: never under-count
        fixed = one - 2 * (x + per_turn)
    except Exception:  # no chat template: plain text
        per_turn, fixed = 0, 0

    def count(turns: list[dict]) -> list[int]:
        if not turns:
            return []
        # A batch call: the fast tokenizer encodes the turns together, in Rust.
        ids = tokenizer([t["value"] for t in turns], add_special_tokens=False)["input_ids"]
        return [len(i) + per_turn for i in ids]

    return count, max(fixed, 0)


class SampleParams(Params):
    n: int = Field(gt=0, le=1_000_000)  # records held in memory
    seed: int = 0


@step
class Sample(Step):
    """A uniform random sample of `n` records (reservoir sampling: memory for `n` records)."""

    name = "sample"
    Params = SampleParams

    def __init__(self, params: SampleParams, context: dict[str, Any]) -> None:
        super().__init__(params, context)
        self.random = random.Random(params.seed)
        self.reservoir: list[dict] = []
        self.seen = 0

    def apply(self, record: dict) -> list[dict]:
        self.seen += 1
        if len(self.reservoir) < self.params.n:
            self.reservoir.append(record)
            return []
        slot = self.random.randrange(self.seen)
        if slot < self.params.n:
            self.reservoir[slot], record = record, self.reservoir[slot]
        raise Drop("not_sampled", record=record)

    def finish(self) -> list[dict]:
        return self.reservoir


class IdentityParams(Params):
    model_name: str = "Corral"
    organization: str = "the Corral project"
    count: int = Field(20, ge=0, le=10_000)
    seed: int = 0


_ASK = [
    "Who are you?",
    "What is your name?",
    "Tell me about yourself.",
    "Which model are you?",
    "Who made you?",
    "Are you ChatGPT?",
    "What should I call you?",
    "Who trained you?",
]
_TELL = [
    "I'm {name}, an AI assistant built by {org}. How can I help?",
    "My name is {name}. I was trained by {org} to answer questions and help with tasks.",
    "I am {name}, a language model from {org}.",
    "You can call me {name}. {org} trained me; ask me anything.",
]


@step
class Identity(Step):
    """Adds `count` conversations in which the model says who it is and who trained it."""

    name = "identity"
    Params = IdentityParams
    adds = True

    def apply(self, record: dict) -> list[dict]:
        return [record]

    def finish(self) -> list[dict]:
        p = self.params
        draw = random.Random(p.seed)
        added = []
        for i in range(p.count):
            answer = draw.choice(_TELL).format(name=p.model_name, org=p.organization)
            turns = [{"from": "human", "value": draw.choice(_ASK)}, {"from": "gpt", "value": answer}]
            added.append({"id": f"identity_{i}", "conversations": turns})
        return added
