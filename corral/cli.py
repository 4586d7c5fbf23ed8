"""`corral`: one command for every component. Flags override CORRAL_* settings."""

from __future__ import annotations

import argparse
import sys

from broker.settings import Settings


def _add_worker_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="built-in name, local folder, .gguf file or hub id")
    parser.add_argument("--served-name", help="the name clients ask for (default: --model)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps", "xpu"])
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, help="CPU threads for the model (0: auto)")
    parser.add_argument("--max-batch", type=int, help="requests decoded together")
    parser.add_argument("--kv-cache-tokens", type=int, help="KV-cache budget in tokens (0: from free memory)")
    parser.add_argument(
        "--chat-template", help="a Jinja file (or template text) to use instead of the tokenizer's"
    )
    parser.add_argument("--worker-id")


def _add_gateway_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="corral", description=__doc__)
    parser.add_argument("--redis-url", help="Redis URL (default: embedded Valkey under CORRAL_HOME)")
    parser.add_argument("--home", help="state folder (default ~/.corral)")
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="run Redis (embedded), the gateway and one worker on this machine")
    _add_gateway_flags(up)
    _add_worker_flags(up)

    _add_gateway_flags(commands.add_parser("gateway", help="run the OpenAI-compatible gateway"))
    _add_worker_flags(commands.add_parser("worker", help="run one worker for one model"))

    chat = commands.add_parser("chat", help="chat in the terminal through a gateway")
    chat.add_argument("--url", default=None, help="gateway URL (default http://HOST:PORT)")
    chat.add_argument("--model", help="model to chat with (default: the first served)")
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.add_argument("--max-tokens", type=int, default=512)
    chat.add_argument("--system", help="a system prompt")
    chat.add_argument("--style", choices=["plain", "rich"], default="plain", help="rich renders markdown")

    from corral.clean import add_parser as add_clean
    from corral.jobs import add_parser as add_jobs

    add_clean(commands)
    add_jobs(commands)
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from the environment, with every flag the user gave on top."""
    flags = {name: getattr(args, name, None) for name in Settings.model_fields}
    return Settings().with_overrides(**flags)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "chat":
        from corral.chat import run_chat

        settings = Settings()
        url = args.url or f"http://{settings.host}:{settings.port}"
        sys.exit(run_chat(url, args))
    settings = settings_from(args)
    if args.command == "clean":
        from corral.clean import run_clean

        sys.exit(run_clean(args, settings))
    if args.command == "jobs":
        from corral.jobs import run_cli

        sys.exit(run_cli(args, settings))
    if args.command == "gateway":
        from gateway.app import main as gateway_main

        gateway_main(settings)
    elif args.command == "worker":
        from workers.serve import main as worker_main

        worker_main(settings)
    elif args.command == "up":
        from corral.up import up

        sys.exit(up(settings))
