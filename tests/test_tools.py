"""Tool calling: the parsers of the three formats on recorded outputs (fed whole and in any
pieces), the grammars that force a call, and, through the API with the official openai client
and LangChain, required and named choices, parallel calls, a tool message round trip, `auto`
with a template that has a tool format, streamed tool_call deltas, and the 400s."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator

import httpx
import jsonschema
import openai
import pytest

from broker.schemas import GenerationRequest
from tests.conftest import MODEL, Stack
from workers.tools import FORMATS, HERMES, LLAMA3, MISTRAL, ToolCallParser, ToolFormat, forced_grammar

# (format, model output, content, [(name, arguments text)])
RECORDED = [
    (
        HERMES,
        "Let me check.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
        "Let me check.\n",
        [("get_weather", '{"city": "Paris", "unit": "celsius"}'), ("get_time", "{}")],
    ),
    (  # keys in the other order, braces inside strings
        HERMES,
        '<tool_call>\n{"arguments": {"a": [1, {"b": "}{"}], "q": "say \\"hi\\""}, "name": "g"}\n</tool_call>',
        "",
        [("g", '{"a": [1, {"b": "}{"}], "q": "say \\"hi\\""}')],
    ),
    (HERMES, "No call here, only a < sign and <tool", "No call here, only a < sign and <tool", []),
    (  # what opens a call but is not one stays content
        HERMES,
        "<tool_call>\nnot JSON at all\n</tool_call> after",
        "<tool_call>\nnot JSON at all\n</tool_call> after",
        [],
    ),
    (  # cut off by max_tokens: the call so far
        HERMES,
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',
        "",
        [("get_weather", '{"city": "Par')],
    ),
    (
        LLAMA3,
        '<|python_tag|>{"name": "f", "parameters": {"x": 1}}; {"name": "g", "parameters": {"s": "a;b"}}',
        "",
        [("f", '{"x": 1}'), ("g", '{"s": "a;b"}')],
    ),
    (
        LLAMA3,
        '{"name": "search", "parameters": {"query": "corral"}}',
        "",
        [("search", '{"query": "corral"}')],
    ),
    (LLAMA3, 'The answer is {"name"}.', 'The answer is {"name"}.', []),
    (
        MISTRAL,
        '[TOOL_CALLS][{"name": "f", "arguments": {"x": 1.5}}, {"name": "g", "arguments": {"s": "[x]"}}]',
        "",
        [("f", '{"x": 1.5}'), ("g", '{"s": "[x]"}')],
    ),
    (MISTRAL, "Hello [TOOL_CALLS] oops", "Hello [TOOL_CALLS] oops", []),
]


def parsed(fmt: ToolFormat, pieces: list[str]) -> tuple[str, list[tuple[str, str]], list[str]]:
    """(content, [(name, arguments)], ids) from feeding the pieces, then finishing."""
    parser = ToolCallParser(fmt, "req", 0)
    content, calls, ids = "", [], []
    for text, deltas in [parser.feed(p) for p in pieces] + [parser.finish()]:
        content += text
        for delta in deltas:
            if delta.id is not None:
                assert delta.index == len(calls) and delta.name
                calls.append([delta.name, ""])
                ids.append(delta.id)
            calls[delta.index][1] += delta.arguments
    return content, [(name, arguments) for name, arguments in calls], ids


def cut(text: str, rng: random.Random) -> list[str]:
    points = sorted(rng.sample(range(1, len(text)), rng.randint(1, min(len(text) - 1, 40))))
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]


@pytest.mark.parametrize(("fmt", "output", "content", "calls"), RECORDED)
def test_each_parser_finds_the_calls_of_recorded_outputs_however_the_text_streams_in(
    fmt: ToolFormat, output: str, content: str, calls: list[tuple[str, str]]
) -> None:
    whole = parsed(fmt, [output])
    assert whole[:2] == (content, calls)
    assert len(set(whole[2])) == len(calls)  # each call its own id
    rng = random.Random(0)
    for _ in range(50):
        assert parsed(fmt, cut(output, rng)) == whole
    assert parsed(fmt, list(output)) == whole  # a character at a time


def test_call_ids_are_the_same_on_every_run_of_a_request_and_differ_between_choices() -> None:
    output = RECORDED[0][1]
    assert parsed(HERMES, [output])[2] == parsed(HERMES, cut(output, random.Random(1)))[2]
    other = ToolCallParser(HERMES, "req", 1)
    other.feed(output)
    assert other.calls == 2
    assert ToolCallParser(HERMES, "req", 1).feed(output)[1][0].id != parsed(HERMES, [output])[2][0]


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Adds two numbers",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "integer", "minimum": -1000, "maximum": 1000},
                "b": {"type": "integer"},
            },
            "required": ["a", "b"],
        },
    },
}
NO_ARGUMENTS = {"type": "function", "function": {"name": "get_time"}}
TOOLS = [WEATHER, ADD, NO_ARGUMENTS]
PARAMETERS = {t["function"]["name"]: t["function"].get("parameters", {"type": "object"}) for t in TOOLS}


@pytest.mark.parametrize("fmt", list(FORMATS.values()), ids=list(FORMATS))
def test_the_forcing_grammar_of_each_format_accepts_its_calls_and_nothing_else(
    fmt: ToolFormat, tokenizer
) -> None:
    from llguidance import LLMatcher
    from llguidance.hf import from_tokenizer

    llg = from_tokenizer(tokenizer)

    def accepts(choice, parallel: bool, text: str) -> bool:
        request = GenerationRequest(
            request_id="r",
            model="m",
            deadline_ms=0,
            tools=TOOLS,
            tool_choice=choice,
            parallel_tool_calls=parallel,
        )
        matcher = LLMatcher(llg, forced_grammar(fmt, request, tokenizer))
        assert not matcher.is_error(), matcher.get_error()
        ids = tokenizer.encode(text)
        return matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()

    paris = ("get_weather", {"city": "Paris"})
    two = [paris, ("add", {"a": 1, "b": 2})]
    assert accepts("required", True, fmt.write([paris]))
    assert accepts("required", True, fmt.write(two))
    assert not accepts("required", False, fmt.write(two))  # parallel_tool_calls: false: one call
    assert accepts(
        {"type": "function", "function": {"name": "add"}}, False, fmt.write([("add", {"a": 1, "b": 2})])
    )
    assert not accepts({"type": "function", "function": {"name": "add"}}, False, fmt.write([paris]))
    assert not accepts("required", True, fmt.write([("add", {"a": 1})]))  # b is required
    assert not accepts("required", True, fmt.write([("get_weather", {"city": "Paris", "x": 1})]))
    assert not accepts("required", True, "Sure! " + fmt.write([paris]))


# Through the API: one worker of the built-in model on its own template (no tool format: the
# worker writes the tools into the system turn), one on Corral's `hermes` template.
HERMES_MODEL = "smollm2-hermes"
QUESTION = "What is the weather in Paris and in London?"


@pytest.fixture(scope="module")
def hermes_worker(stack: Stack) -> Iterator[str]:
    worker = stack.start_worker(served_name=HERMES_MODEL, CORRAL_CHAT_TEMPLATE="hermes")
    yield HERMES_MODEL
    worker.terminate()


def api(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, timeout=300)


def ask(stack: Stack, model: str, content: str | list, stream: bool = False, **fields):
    """(content, [(id, name, arguments)], finish_reason) of the one choice, streamed or not."""
    messages = [{"role": "user", "content": content}] if isinstance(content, str) else content
    body = {
        "model": model,
        "messages": messages,
        "temperature": 0,
        "max_tokens": 200,
        "tools": TOOLS,
    } | fields
    if not stream:
        choice = api(stack).chat.completions.create(**body).choices[0]
        calls = [(c.id, c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
        return choice.message.content, calls, choice.finish_reason
    text, calls, finish = "", [], None
    for chunk in api(stack).chat.completions.create(**body, stream=True):
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        text += choice.delta.content or ""
        for delta in choice.delta.tool_calls or []:
            if delta.id is not None:  # a call's first piece: id, type and name
                assert delta.index == len(calls) and delta.type == "function" and delta.function.name
                calls.append([delta.id, delta.function.name, ""])
            else:
                assert delta.function.name is None
            calls[delta.index][2] += delta.function.arguments or ""
        finish = choice.finish_reason or finish
    return text or None, [tuple(c) for c in calls], finish


def valid(calls: list) -> None:
    for _, name, arguments in calls:
        jsonschema.validate(json.loads(arguments), PARAMETERS[name])


@pytest.mark.parametrize("model", [MODEL, HERMES_MODEL])
def test_required_and_named_choices_give_valid_calls_streamed_or_not(
    stack: Stack, hermes_worker: str, model: str
) -> None:
    named = {"type": "function", "function": {"name": "add"}}
    for choice, names in (("required", {"get_weather", "add", "get_time"}), (named, {"add"})):
        whole = ask(stack, model, QUESTION, tool_choice=choice)
        streamed = ask(stack, model, QUESTION, stream=True, tool_choice=choice)
        content, calls, finish = whole
        assert (content, [c[1:] for c in calls], finish) == (
            streamed[0],
            [c[1:] for c in streamed[1]],
            streamed[2],
        )
        assert content is None and finish == "tool_calls" and calls
        assert {name for _, name, _ in calls} <= names
        valid(calls)


def test_parallel_tool_calls_give_several_calls_and_false_gives_one(stack: Stack, hermes_worker: str) -> None:
    _, several, _ = ask(stack, HERMES_MODEL, QUESTION, tool_choice="required")
    assert len(several) >= 2 and len({c[0] for c in several}) == len(several)
    _, one, finish = ask(stack, HERMES_MODEL, QUESTION, tool_choice="required", parallel_tool_calls=False)
    assert len(one) == 1 and finish == "tool_calls"
    valid(several + one)


def test_auto_with_a_tool_template_parses_a_call_the_model_chose_to_make(
    stack: Stack, hermes_worker: str
) -> None:
    """Unconstrained: the model writes the call (asked to repeat one), the parser finds it."""
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    prompt = f"Repeat exactly, with nothing else: {call}"
    for stream in (False, True):
        content, calls, finish = ask(stack, HERMES_MODEL, prompt, stream=stream, tool_choice="auto")
        assert (content, [c[1:] for c in calls], finish) == (
            None,
            [("get_weather", '{"city": "Paris"}')],
            "tool_calls",
        )
    content, calls, finish = ask(stack, HERMES_MODEL, "Say hello.")  # auto is the default with tools
    assert content and not calls and finish == "stop"


@pytest.mark.parametrize("model", [MODEL, HERMES_MODEL])
def test_a_tool_message_round_trip_ends_in_an_answer_that_uses_the_result(
    stack: Stack, hermes_worker: str, model: str
) -> None:
    question = {"role": "user", "content": "What is the weather in Paris?"}
    _, [(call_id, name, arguments)], _ = ask(
        stack, model, [question], tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
    )  # fmt: skip
    history = [
        question,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": "It is 31 degrees and sunny."},
    ]
    content, calls, finish = ask(stack, model, history, tool_choice="none")
    assert finish == "stop" and not calls
    assert "31" in content or "sunny" in content.lower(), content


def test_langchain_bind_tools_agent_loop_runs_a_real_tool_to_the_final_answer(
    stack: Stack, hermes_worker: str
) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    ran: list[tuple[int, int]] = []

    @tool
    def multiply(a: int, b: int) -> int:
        """Multiplies two integers."""
        ran.append((a, b))
        return a * b

    model = ChatOpenAI(
        base_url=f"{stack.url}/v1", api_key="unused", model=HERMES_MODEL, temperature=0, max_tokens=120
    )
    first = model.bind_tools([multiply], tool_choice="multiply")  # the first step must use the tool
    then = model.bind_tools([multiply])  # after that the model decides (auto)
    messages: list = [HumanMessage("What is 6 times 7? Use the multiply tool.")]
    for step in range(4):
        reply = (first if step == 0 else then).invoke(messages)
        messages.append(reply)
        if not reply.tool_calls:
            break
        for call in reply.tool_calls:
            result = multiply.invoke(call["args"])
            messages.append(ToolMessage(str(result), tool_call_id=call["id"]))
    assert ran and all(isinstance(a, int) and isinstance(b, int) for a, b in ran)
    assert not messages[-1].tool_calls and messages[-1].content  # it ended with an answer
    assert isinstance(messages[2], ToolMessage)


@pytest.mark.parametrize(
    ("path", "fields", "param", "message"),
    [
        (
            "chat",
            {"tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "'nope'",
        ),
        ("chat", {"tools": None, "tool_choice": "required"}, "tool_choice", "needs tools"),
        ("chat", {"tools": [WEATHER, WEATHER]}, "tool_choice", "same name"),
        (
            "chat",
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}],
                "tool_choice": "required",
            },
            "tools",
            "tool 'f'",
        ),
        ("chat", {"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools", "pattern"),
        (
            "chat",
            {"tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
            "",
        ),
        ("chat", {"messages": [{"role": "tool", "content": "42"}]}, "messages", "tool_call_id"),
        ("completions", {}, "tools", "only accepted by /v1/chat/completions"),
    ],
)
def test_bad_tool_fields_are_400s_that_name_the_field(
    stack: Stack, path: str, fields: dict, param: str, message: str
) -> None:
    if path == "chat":
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS} | fields
    else:
        body = {"model": MODEL, "prompt": "hi", "tools": TOOLS}
    response = httpx.post(f"{stack.url}/v1/{path.replace('chat', 'chat/completions')}", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"] or "").startswith(param) and message in error["message"], error


def test_a_choice_taken_over_mid_call_sends_what_the_uninterrupted_one_would(tokenizer) -> None:
    """A survivor replays the text already sent through its parser: the calls' pieces it sends
    after the takeover complete exactly what the dead worker had started."""
    from broker.progress import ChoiceProgress
    from broker.queue import Claimed
    from workers.engine import StepOutput
    from workers.sequence import Sequence

    request = GenerationRequest(
        request_id="g.take",
        model=MODEL,
        deadline_ms=2**42,
        messages=[{"role": "user", "content": "hi"}],
        tools=TOOLS,
    )
    output = [*tokenizer.encode(RECORDED[0][1]), tokenizer.eos_token_id]

    def run(resume_at: int | None) -> list:
        first = Sequence(Claimed("1-0", request), [1, 2], tokenizer, 4096, tool_format=HERMES)
        events = []
        for at, token in enumerate(output):
            if at == resume_at:  # the first worker dies; a second continues from its progress
                progress = ChoiceProgress(
                    seq=first._seq, sent=first.sent_chars, done=False, tokens=first.generated
                )
                first = Sequence(
                    Claimed("1-0", request, reclaimed=True), [1, 2], tokenizer, 4096, tool_format=HERMES
                )
                first.resume(progress)
            last = at == len(output) - 1
            out = StepOutput("g.take/0", [token], finished=last, finish_reason="stop" if last else None)
            events += first.advance(out)
        return [(e.seq, e.text, e.tool_calls, e.finish_reason) for e in events]

    whole = run(None)
    assert whole[-1][3] == "tool_calls"
    calls = [d for _, _, deltas, _ in whole for d in deltas or []]
    assert [d.name for d in calls if d.id] == ["get_weather", "get_time"]
    for cut_at in (5, len(output) // 3, len(output) // 2, len(output) - 3):
        assert run(cut_at) == whole, cut_at
