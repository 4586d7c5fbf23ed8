"""`corral chat`: a terminal chat through the gateway's OpenAI API, streamed.

Commands: !!exit, !!reset, !!regen, !!save FILE, !!load FILE."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown

HELP = "commands: !!exit  !!reset  !!regen  !!save FILE  !!load FILE"


class ChatSession:
    """The conversation and the calls that extend it; no terminal I/O, so it can be tested."""

    def __init__(
        self, client: httpx.Client, model: str, temperature: float, max_tokens: int, system: str | None
    ):
        self.client = client
        self.model = model
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.system = system
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"model": self.model, "messages": self.messages}, indent=2))

    def load(self, path: Path) -> None:
        self.messages = json.loads(path.read_text())["messages"]

    def stream_reply(self) -> Iterator[str]:
        """Stream the assistant's reply to the conversation so far, then append it. Stopped early
        (the caller closes the iterator: Ctrl-C), the text so far is kept as the reply."""
        body = {
            "model": self.model,
            "messages": self.messages,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "stream": True,
        }
        parts: list[str] = []
        try:
            # Leaving this block early closes the connection, which cancels the request.
            with self.client.stream("POST", "/v1/chat/completions", json=body, timeout=None) as response:
                if response.status_code != 200:
                    response.read()
                    raise httpx.HTTPStatusError(
                        _error_message(response), request=response.request, response=response
                    )
                for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise RuntimeError(chunk["error"]["message"])
                    for choice in chunk["choices"]:
                        text = choice["delta"].get("content")
                        if text:
                            parts.append(text)
                            yield text
        finally:
            if parts:
                self.messages.append({"role": "assistant", "content": "".join(parts)})

    def regen(self) -> Iterator[str]:
        if self.messages and self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        return self.stream_reply()


def _error_message(response: httpx.Response) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}"


def _show(console: Console, chunks: Iterator[str], rich: bool) -> None:
    console.print("ASSISTANT:", end="\n" if rich else " ")  # Live redraws its own lines
    if not rich:
        for text in chunks:
            console.out(text, end="", highlight=False)
        console.out("")
        return
    shown = ""
    with Live(Markdown(""), console=console, refresh_per_second=8) as live:
        for text in chunks:
            shown += text
            live.update(Markdown(shown))


def _answer(console: Console, chunks: Iterator[str], show: Callable[[Iterator[str]], None]) -> None:
    """Shows a streamed reply; Ctrl-C stops it (the request is cancelled) and returns to the prompt."""
    try:
        show(chunks)
    except KeyboardInterrupt:
        chunks.close()  # type: ignore[attr-defined]  (a generator: closing it closes the stream)
        console.print("\n(stopped)", highlight=False)


def _command(session: ChatSession, line: str, show: Callable[[Iterator[str]], None]) -> bool:
    """Run a !! command; False means exit."""
    name, _, arg = line[2:].partition(" ")
    if name == "exit":
        return False
    if name == "reset":
        session.reset()
        print("(conversation reset)")
    elif name == "regen":
        show(session.regen())
    elif name in ("save", "load") and arg:
        getattr(session, name)(Path(arg.strip()).expanduser())
        print(f"({name[:-1]}ed {arg.strip()})")
    else:
        print(HELP)
    return True


def run_chat(url: str, args: argparse.Namespace) -> int:
    console = Console()
    with httpx.Client(base_url=url, timeout=10) as client:
        try:
            served = [m["id"] for m in client.get("/v1/models").json()["data"]]
        except httpx.HTTPError as e:
            console.print(f"[red]cannot reach the gateway at {url}: {e}[/red]")
            return 1
        model = args.model or (served[0] if served else None)
        if model is None:
            console.print("[red]no model is being served: start a worker (corral worker)[/red]")
            return 1
        session = ChatSession(client, model, args.temperature, args.max_tokens, args.system)
        console.print(f"chatting with {model} at {url} — {HELP}")
        rich = args.style == "rich"
        show = lambda chunks: _answer(console, chunks, lambda c: _show(console, c, rich))  # noqa: E731
        while True:
            try:
                line = input("USER: ").strip()
            except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt: leave cleanly
                print()
                return 0
            if not line:
                continue
            try:
                if line.startswith("!!"):
                    if not _command(session, line, show):
                        return 0
                    continue
                session.messages.append({"role": "user", "content": line})
                show(session.stream_reply())
            except (httpx.HTTPError, RuntimeError) as e:
                console.print(f"[red]error: {e}[/red]")
            if session.messages and session.messages[-1]["role"] == "user":
                session.messages.pop()  # no reply came: the question is taken back, to ask again
