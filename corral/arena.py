"""`corral arena export`: the arena's log from a gateway, as JSONL in FastChat's conversation-log
shape (the files FastChat's clean_battle_data.py and elo_analysis.py read)."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
from rich.console import Console

from broker.settings import Settings


def add_parser(commands) -> None:
    arena = commands.add_parser("arena", help="the arena's records")
    actions = arena.add_subparsers(dest="action", required=True)
    export = actions.add_parser("export", help="battles, turns and votes as FastChat-shaped JSONL")
    export.add_argument("--url", help="gateway URL (default http://HOST:PORT)")
    export.add_argument("-o", "--output", help="file to write (default: standard output)")
    export.add_argument(
        "--include",
        choices=["all", "votes"],
        default="all",
        help="votes only, or each battle turn's `chat` records as well",
    )
    export.add_argument("--api-key", help="the gateway's API key, if it asks for one")


def run_cli(args, settings: Settings) -> int:
    url = args.url or settings.own_gateway_url
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    console = Console(stderr=True)
    out = Path(args.output).open("wb") if args.output else sys.stdout.buffer  # noqa: SIM115 (closed below)
    lines = 0
    try:
        with httpx.stream(
            "GET", f"{url}/v1/arena/export", params={"include": args.include}, headers=headers, timeout=60
        ) as response:
            if response.status_code != 200:
                console.print(f"[red]export failed: {response.status_code} {response.read().decode()}[/red]")
                return 1
            for line in response.iter_lines():
                out.write(line.encode() + b"\n")
                lines += 1
    except httpx.HTTPError as e:
        console.print(f"[red]cannot reach the gateway at {url}: {e}[/red]")
        return 1
    finally:
        if args.output:
            out.close()
    console.print(f"{lines} records" + (f" → {args.output}" if args.output else ""))
    return 0
