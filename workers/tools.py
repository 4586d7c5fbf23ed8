"""Tool calling in the worker: how a model writes a call of a tool (its format), the parser that
turns that output into OpenAI tool calls as it streams, the grammar that makes a `required` or
named `tool_choice` a valid call, and the prompt for a chat template with no tool format.

Three formats cover the common chat models (vLLM's parser names):
- `hermes` (Hermes, Qwen 2.5/3, and Corral's `hermes` template): each call is
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, anywhere in the answer;
- `llama3_json` (Llama 3.1-3.3): the answer is `{"name": ..., "parameters": {...}}`, optionally
  after `<|python_tag|>`, several calls joined by `;`;
- `mistral`: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from broker.schemas import ChatMessage, GenerationRequest, ToolCallDelta
from broker.structured import LAYOUT, SchemaError, closed_objects


@dataclass(frozen=True)
class ToolFormat:
    name: str
    # The text that opens the calls. `anywhere`: it may follow some content; otherwise the
    # answer must start with it, or with the first call's `{` when `bare` allows that.
    opener: str
    anywhere: bool
    bare: bool
    # The key of a call's arguments.
    arguments_key: str
    # Around each call, around the list of calls, and between calls, as the grammar writes them.
    call_open: str = ""
    call_close: str = ""
    list_open: str = ""
    list_close: str = ""
    between: str = ""

    def write(self, calls: list[tuple[str, Any]]) -> str:
        """The calls (name, arguments) as this format writes them (a history's assistant turn)."""
        objects = [
            self.call_open + json.dumps({"name": name, self.arguments_key: arguments}) + self.call_close
            for name, arguments in calls
        ]
        opener = "" if self.bare else self.opener  # a bare format's calls are written without it
        return opener + self.list_open + self.between.join(objects) + self.list_close


HERMES = ToolFormat(
    "hermes",
    opener="",
    anywhere=True,
    bare=False,
    arguments_key="arguments",
    call_open="<tool_call>\n",
    call_close="\n</tool_call>",
    between="\n",
)
LLAMA3 = ToolFormat(
    "llama3_json",
    opener="<|python_tag|>",
    anywhere=False,
    bare=True,
    arguments_key="parameters",
    between="; ",
)
MISTRAL = ToolFormat(
    "mistral",
    opener="[TOOL_CALLS]",
    anywhere=True,
    bare=False,
    arguments_key="arguments",
    list_open="[",
    list_close="]",
    between=", ",
)
FORMATS = {f.name: f for f in (HERMES, LLAMA3, MISTRAL)}


def pick_format(forced: str | None, template: str | None) -> ToolFormat:
    """`--tool-parser` when given; otherwise the format the chat template writes calls in
    (Hermes when it shows none)."""
    if forced:
        return FORMATS[forced]
    template = template or ""
    if "[TOOL_CALLS]" in template:
        return MISTRAL
    if "<|python_tag|>" in template or "ipython" in template:
        return LLAMA3
    return HERMES


def call_id(request_id: str, index: int, number: int) -> str:
    """A call's id: the same on every run of the request, so a takeover gives the same ids."""
    digest = hashlib.sha256(f"{request_id}/{index}/{number}".encode()).hexdigest()
    return f"call_{digest[:24]}"


# A call object's head: its name, then the key of its arguments, up to the arguments' value.
_HEAD = re.compile(
    r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.){1,256})"\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\S)'
)
# How far into a call object its head is looked for; past it, the object is parsed once whole.
_HEAD_WINDOW = 400


class ToolCallParser:
    """Splits an answer's text, fed as it streams, into content and tool-call deltas: a call's id
    and name as soon as its head is written, its arguments' text as it comes. What it returns is
    a function of the text fed so far alone, so a takeover replays the sent text to rebuild it.
    Text that opens a call and turns out not to be one goes out as content."""

    def __init__(self, fmt: ToolFormat, request_id: str, index: int) -> None:
        self.fmt = fmt
        self.request_id, self.index = request_id, index
        self.text = ""
        self.at = 0  # where parsing stands in `text`
        self.state = "content" if fmt.anywhere else "lead"
        self.calls = 0
        self._section = 0  # where the text that opened the current calls began
        self._reset_object(0)

    def _reset_object(self, start: int) -> None:
        self._start = start
        self._scan = start
        self._depth = 0
        self._in_string = self._escaped = False
        self._delimiters: list[int] = []  # `,` and `}` at the object's own level
        self._head: re.Match[str] | None = None
        self._args_sent = 0

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        self.text += text
        return self._run(final=False)

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """What is still held back, at the end of the answer."""
        return self._run(final=True)

    def _run(self, final: bool) -> tuple[str, list[ToolCallDelta]]:
        content: list[str] = []
        deltas: list[ToolCallDelta] = []
        while True:
            step = getattr(self, f"_{self.state}")(content, deltas, final)
            if not step:
                break
        merged: list[ToolCallDelta] = []
        for delta in deltas:  # a call's pieces from one feed go out as one
            if merged and merged[-1].index == delta.index and delta.id is None:
                merged[-1].arguments += delta.arguments
            else:
                merged.append(delta)
        return "".join(content), merged

    # Each state consumes what it can and returns whether another state should run now.

    def _lead(self, content: list[str], deltas: list[ToolCallDelta], final: bool) -> bool:
        """The start of an answer in a format whose calls can only open it."""
        rest = self.text[self.at :].lstrip()
        opener = self.fmt.opener
        if rest.startswith(opener):
            self._section, self.at, self.state = self.at, len(self.text) - len(rest) + len(opener), "object"
            return True
        if self.fmt.bare and rest.startswith("{"):
            self._section, self.at, self.state = self.at, len(self.text) - len(rest), "object"
            return True
        if not final and (not rest or opener.startswith(rest)):
            return False  # still undecided
        self.state = "plain"
        return True

    def _plain(self, content: list[str], deltas: list[ToolCallDelta], final: bool) -> bool:
        """Content to the end: no call can come any more."""
        content.append(self.text[self.at :])
        self.at = len(self.text)
        return False

    def _content(self, content: list[str], deltas: list[ToolCallDelta], final: bool) -> bool:
        marker = self.fmt.opener or self.fmt.call_open.strip()
        found = self.text.find(marker, self.at)
        end = found if found >= 0 else len(self.text) - (0 if final else _partial(self.text, marker, self.at))
        piece = self.text[self.at : end]
        if self.calls and not piece.strip() and not final and found < 0:
            return False  # whitespace after a call: held until something else follows it
        if not (self.calls and not piece.strip()):
            content.append(piece)
        self.at = end
        if found < 0:
            return False
        self._section = found
        self.at = found + len(marker)
        self.state = "list" if self.fmt.list_open else "object"
        return True

    def _list(self, content: list[str], deltas: list[ToolCallDelta], final: bool) -> bool:
        rest = self.text[self.at :].lstrip()
        if not rest:
            return self._give_up(content) if final else False
        if not rest.startswith(self.fmt.list_open):
            return self._give_up(content)
        self.at = len(self.text) - len(rest) + len(self.fmt.list_open)
        self.state = "object"
        return True

    def _object(self, content: list[str], deltas: list[ToolCallDelta], final: bool) -> bool:
        rest = self.text[self.at :].lstrip()
        if not rest:
            return self._give_up(content) if final else False
        if not rest.startswith("{"):
            return self._give_up(content)
        self._reset_object(len(self.text) - len(rest))
        self.state = "call"
        return True

    def _call(self, content: list[str], deltas: list[ToolCallDelta], final: bool) -> bool:
        if self._head is None and self._scan - self._start < _HEAD_WINDOW:
            self._head = _HEAD.match(self.text, self._start)
            if self._head is not None:
                name = json.loads(f'"{self._head.group(1)}"')
                deltas.append(self._delta(id=call_id(self.request_id, self.index, self.calls), name=name))
        closed = self._scan_object()
        if self._head is not None:
            self._send_arguments(deltas)
        if closed is None:
            if final and self._head is None:
                return self._give_up(content)
            if final:
                self.calls += 1
            return False
        if self._head is None and not self._whole_call(closed, deltas):
            return self._give_up(content)
        self.calls += 1
        self.at = self._section = closed
        self.state = "after"
        return True

    def _after(self, content: list[str], deltas: list[ToolCallDelta], final: bool) -> bool:
        """Between a call's object and what follows it."""
        fmt = self.fmt
        rest = self.text[self.at :].lstrip()
        skipped = len(self.text) - len(rest)
        close = fmt.call_close.strip()
        if close:
            if rest.startswith(close):
                self.at, self.state = skipped + len(close), "content"
                return True
            if not final and close.startswith(rest):
                return False
            self.at, self.state = skipped, "content"
            return True
        if not rest and not final:
            return False
        separator = fmt.between.strip()
        if rest.startswith(separator):
            self.at, self.state = skipped + len(separator), "object"
            return True
        if fmt.list_close and rest.startswith(fmt.list_close):
            self.at = skipped + len(fmt.list_close)
        self.state = "content" if fmt.anywhere else "plain"
        return True

    def _scan_object(self) -> int | None:
        """Scans the call object on from where the last feed stopped; the index just past its
        closing brace once it is there."""
        text = self.text
        for at in range(self._scan, len(text)):
            char = text[at]
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
                continue
            if char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                if self._depth == 1:
                    self._delimiters.append(at)
                self._depth -= 1
                if self._depth == 0:
                    self._scan = at + 1
                    return at + 1
            elif char == "," and self._depth == 1:
                self._delimiters.append(at)
        self._scan = len(text)
        return None

    def _send_arguments(self, deltas: list[ToolCallDelta]) -> None:
        """The arguments' text written since the last feed (trailing spaces are held back: they
        are the value's only if more of it follows)."""
        assert self._head is not None
        start = self._head.end()
        ends = [d for d in self._delimiters if d >= start]
        piece = self.text[start : ends[0] if ends else self._scan].rstrip()[self._args_sent :]
        if piece:
            self._args_sent += len(piece)
            deltas.append(self._delta(arguments=piece))

    def _whole_call(self, end: int, deltas: list[ToolCallDelta]) -> bool:
        """A call object whose head was not in the usual order: parsed once complete."""
        try:
            call = json.loads(self.text[self._start : end])
        except ValueError:
            return False
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return False
        arguments = call.get(self.fmt.arguments_key, call.get("arguments", call.get("parameters", {})))
        deltas.append(self._delta(id=call_id(self.request_id, self.index, self.calls), name=call["name"]))
        deltas.append(self._delta(arguments=json.dumps(arguments, ensure_ascii=False)))
        return True

    def _give_up(self, content: list[str]) -> bool:
        """What opened a call was not one: its text is content after all."""
        content.append(self.text[self._section :])
        self.at = len(self.text)
        self.state = "content" if self.fmt.anywhere else "plain"
        return False

    def _delta(self, **fields: Any) -> ToolCallDelta:
        return ToolCallDelta(index=self.calls, **fields)


def _partial(text: str, marker: str, start: int) -> int:
    """The length of the longest end of text[start:] that begins `marker` (held back)."""
    for n in range(min(len(marker) - 1, len(text) - start), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


def _call_schema(fmt: ToolFormat, tool: dict[str, Any]) -> dict[str, Any]:
    function = tool["function"]
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, fmt.arguments_key: closed_objects(parameters)},
        "required": ["name", fmt.arguments_key],
        "additionalProperties": False,
    }


def grammar(
    fmt: ToolFormat,
    tools: list[dict[str, Any]],
    choice: str | dict[str, Any],
    parallel: bool,
    vocabulary: dict[str, int],
    special: set[str],
) -> str:
    """The llguidance grammar (Lark) of an answer that calls the chosen tool, or any of the
    tools for `required`: one call, or one or more when calls may be parallel."""
    if isinstance(choice, dict):
        wanted = choice["function"]["name"]
        tools = [t for t in tools if t["function"]["name"] == wanted]
    schemas = [_call_schema(fmt, t) for t in tools]
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    body = f"%json{json.dumps({**schema, 'x-guidance': LAYOUT})}"
    opener = _literal(fmt.opener, vocabulary, special) if fmt.opener and not fmt.bare else ""
    more = f"({_literal(fmt.between)} call)*" if parallel else ""
    start = [opener, _literal(fmt.list_open), "call", more, _literal(fmt.list_close)]
    call = [_literal(fmt.call_open), body, _literal(fmt.call_close)]
    rules = (("start", start), ("call", call))
    return "\n".join(f"{rule}: {' '.join(item for item in items if item)}" for rule, items in rules)


def forced_grammar(fmt: ToolFormat, request: GenerationRequest, tokenizer: Any) -> str:
    """The llguidance grammar of a request whose tool_choice forces a call."""
    from llguidance import LLMatcher

    special = set(getattr(tokenizer, "all_special_tokens", ()))
    vocabulary = tokenizer.get_vocab() if fmt.opener in special else {}
    tools, choice = request.tools or [], request.tool_choice
    lark = grammar(fmt, tools, choice, request.parallel_tool_calls, vocabulary, special)
    try:
        return str(LLMatcher.grammar_from_lark(lark))
    except (ValueError, TypeError) as e:
        raise SchemaError(str(e)) from e


def _literal(text: str, vocabulary: dict[str, int] | None = None, special: set[str] | None = None) -> str:
    """A Lark terminal for `text`; a special token of the vocabulary by its id (its text never
    matches it)."""
    if not text:
        return ""
    if vocabulary is not None and special is not None and text in special and text in vocabulary:
        return f"<[{vocabulary[text]}]>"
    return json.dumps(text)


# The prompt for a chat template that shows no tools: the tools go into the system turn, calls
# in the history are written in the format, and tools' answers go in user turns.
_INSTRUCTIONS = """You can call functions to answer. They are described below as JSON schemas, one per line:
{tools}
To call one, answer with its name and arguments written exactly like this:
{example}"""


def plain_messages(
    messages: list[ChatMessage], tools: list[dict[str, Any]] | None, fmt: ToolFormat
) -> list[dict[str, str]]:
    """The conversation with its tools and calls as plain text turns."""
    out: list[dict[str, str]] = []
    for message in messages:
        content = message.content
        if message.tool_calls:
            calls = [(c.function.name, _arguments(c.function.arguments)) for c in message.tool_calls]
            written = fmt.write(calls)
            content = f"{content}\n{written}" if content else written
        if message.role == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"})
        else:
            out.append({"role": message.role, "content": content})
    if tools:
        listed = "\n".join(json.dumps(t["function"]) for t in tools)
        example = fmt.write([("<function name>", {"<argument>": "<value>"})])
        instructions = _INSTRUCTIONS.format(tools=listed, example=example)
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {"role": out[0]["role"], "content": f"{out[0]['content']}\n\n{instructions}"}
        else:
            out.insert(0, {"role": "system", "content": instructions})
    return out


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The conversation as Hugging Face chat templates take it: a call's arguments as a dict."""
    out = []
    for message in messages:
        item: dict[str, Any] = {"role": message.role, "content": message.content}
        if message.tool_calls:
            item["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)},
                }
                for c in message.tool_calls
            ]
        if message.tool_call_id is not None:
            item["tool_call_id"] = message.tool_call_id
        out.append(item)
    return out


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text
