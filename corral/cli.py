"""`corral`: one command for every component. Flags override CORRAL_* settings."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from broker.settings import Settings


def _add_worker_flags(parser: argparse.ArgumentParser, several: bool = False) -> None:
    if several:
        parser.add_argument(
            "--model",
            action="append",
            dest="models",
            metavar="MODEL",
            help="built-in name, local folder, .gguf file or hub id; repeatable, one "
            "worker each (default: smollm2-135m-instruct)",
        )
    else:
        parser.add_argument("--model", help="built-in name, local folder, .gguf file or hub id")
    parser.add_argument("--served-name", help="the name clients ask for (default: --model)")
    parser.add_argument(
        "--model-info-file",
        help="YAML: served name → display_name, link, organization, license, description",
    )
    parser.add_argument("--display-name", help="the model's name for people")
    parser.add_argument("--model-link", help="a page about the model")
    parser.add_argument("--organization", help="who made the model")
    parser.add_argument("--model-license", help="the model's license")
    parser.add_argument("--model-description", help="one line about the model")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps", "xpu"])
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, help="CPU threads for the model (0: auto)")
    parser.add_argument("--max-batch", type=int, help="requests decoded together")
    parser.add_argument("--kv-cache-tokens", type=int, help="KV-cache budget in tokens (0: from free memory)")
    parser.add_argument(
        "--batch-invariant",
        action="store_true",
        default=None,
        help="a token's numbers do not depend on what shares its batch: greedy text equal alone and "
        "batched, in bf16 too (costs throughput; see docs/decisions.md)",
    )
    parser.add_argument(
        "--chat-template",
        help="instead of the tokenizer's template: a name (vicuna, llama-2-chat, llama-3, alpaca, chatml, "
        "zephyr, mistral-instruct, one-shot, hermes (with tools); each brings its stop strings), a Jinja "
        "file, or template text",
    )
    parser.add_argument(
        "--tool-parser",
        choices=["hermes", "llama3_json", "mistral"],
        help="how the model writes tool calls (default: read off the chat template; hermes if it shows none)",
    )
    parser.add_argument(
        "--lora",
        action="append",
        metavar="NAME=PATH",
        help="serve a LoRA adapter (peft folder) as model NAME on the base weights; repeatable",
    )
    parser.add_argument(
        "--profile",
        action="append",
        dest="profiles",
        metavar="NAME=JSON|FILE",
        help="serve the model's weights under NAME too, with its own system prompt and sampling preset "
        "(JSON or a YAML file: system, temperature, top_p, top_k, min_p, max_tokens, penalties, "
        "display_name, description); repeatable",
    )
    parser.add_argument("--worker-id")
    parser.add_argument(
        "--load-8bit",
        action="store_true",
        default=None,
        help="quantize the weights to 8 bits on load (bitsandbytes; CPU or GPU)",
    )
    parser.add_argument("--num-gpus", type=int, help="spread the weights over this many GPUs (device map)")
    parser.add_argument("--max-gpu-memory", help='per GPU when spread, e.g. "20GiB" (default: what is free)')
    parser.add_argument(
        "--cpu-offloading",
        action="store_true",
        default=None,
        help="put the layers that do not fit on the GPUs in CPU memory",
    )
    parser.add_argument(
        "--engine",
        choices=["auto", "continuous", "generate"],
        help="batching, or one request at a time (auto: batching where it can)",
    )
    parser.add_argument(
        "--upstream-url",
        help="serve the model by forwarding to this OpenAI-compatible /v1 base URL "
        "(its key: the CORRAL_UPSTREAM_API_KEY environment variable)",
    )
    parser.add_argument("--upstream-model", help="the upstream's model id (default: --served-name)")
    parser.add_argument(
        "--upstream-extra-body", type=json.loads, help="JSON merged into every upstream request body"
    )
    parser.add_argument(
        "--load-4bit",
        action="store_true",
        default=None,
        help="quantize the weights to 4 bits (NF4) on load (bitsandbytes)",
    )


def _add_gateway_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="serve a non-loopback host with no API keys (all callers users)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="corral", description=__doc__)
    parser.add_argument("--redis-url", help="Redis URL (default: embedded Valkey under CORRAL_HOME)")
    parser.add_argument("--home", help="state folder (default ~/.corral)")
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser(
        "up",
        help="run Redis (embedded), the gateway, one worker, the job runner and the web UI on this machine",
    )
    _add_gateway_flags(up)
    up.add_argument("--ui-port", type=int, help="the web UI's port (default 8501)")
    up.add_argument(
        "--no-profile",
        action="store_true",
        help="serve a lone model alone (by default a concise profile of it is served "
        "beside it, so the arena has two contestants)",
    )
    _add_worker_flags(up, several=True)

    commands.add_parser("status", help="what `corral up` runs on this machine, on which ports")
    commands.add_parser("stop", help="stop what `corral up` runs on this machine")
    _add_gateway_flags(commands.add_parser("gateway", help="run the OpenAI-compatible gateway"))
    ui = commands.add_parser("ui", help="run the web UI (chat, arena, side-by-side, leaderboard)")
    _add_gateway_flags(ui)
    ui.add_argument("--ui-port", type=int, help="the UI's port (default 8501)")
    ui.add_argument("--gateway-url", help="where the gateway runs (default http://HOST:PORT)")
    _add_worker_flags(commands.add_parser("worker", help="run one worker for one model"))

    cluster = commands.add_parser(
        "cluster-create", help="join fresh cluster-enabled Redis/Valkey nodes into one Redis Cluster"
    )
    cluster.add_argument("nodes", nargs="+", metavar="HOST:PORT", help="the nodes, masters first")
    cluster.add_argument("--replicas", type=int, default=1, help="replicas per master (default 1)")

    chat = commands.add_parser("chat", help="chat in the terminal through a gateway")
    chat.add_argument("--url", default=None, help="gateway URL (default http://HOST:PORT)")
    chat.add_argument("--model", help="model to chat with (default: the first served)")
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.add_argument("--max-tokens", type=int, default=512)
    chat.add_argument("--system", help="a system prompt")
    chat.add_argument("--style", choices=["plain", "rich"], default="plain", help="rich renders markdown")

    from corral.arena import add_parser as add_arena
    from corral.clean import add_parser as add_clean
    from corral.jobs import add_parser as add_jobs
    from corral.judge import add_parser as add_judge
    from corral.train import add_parser as add_train

    add_clean(commands)
    add_jobs(commands)
    add_arena(commands)
    add_train(commands)
    add_judge(commands)
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from the environment, with every flag the user gave on top."""
    flags = {name: getattr(args, name, None) for name in Settings.model_fields}
    return Settings().with_overrides(**flags)


# Subcommand → (module, its function of (args, settings) → exit status).
_RUN_CLI = {
    "clean": ("corral.clean", "run_clean"),
    "judge": ("corral.judge", "run_cli"),
    "train": ("corral.train", "run_train"),
    "arena": ("corral.arena", "run_cli"),
    "jobs": ("corral.jobs", "run_cli"),
}


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "cluster-create":
        sys.exit(_cluster_create(args.nodes, args.replicas))
    if args.command == "chat":
        from corral.chat import run_chat

        settings = Settings()
        url = args.url or settings.own_gateway_url
        sys.exit(run_chat(url, args))
    settings = settings_from(args)
    if args.command in _RUN_CLI:  # subcommands with a module of their own
        module, function = _RUN_CLI[args.command]
        sys.exit(getattr(importlib.import_module(module), function)(args, settings))
    if args.command in ("status", "stop"):
        from corral import up

        sys.exit(getattr(up, args.command)(settings))
    if args.command == "ui":
        from corral.up import run_ui

        sys.exit(run_ui(settings))
    if args.command == "gateway":
        from gateway.app import main as gateway_main

        gateway_main(settings)
    elif args.command == "worker":
        from workers.serve import main as worker_main

        worker_main(settings)
    elif args.command == "up":
        from corral.up import up

        sys.exit(up(settings, args.models or [settings.model], default_profile=not args.no_profile))


def _cluster_create(nodes: list[str], replicas: int) -> int:
    from broker.cluster import create_cluster

    addresses = []
    for node in nodes:
        host, _, port = node.rpartition(":")
        if not host or not port.isdigit():
            print(f"corral: not HOST:PORT: {node!r}", file=sys.stderr)
            return 2
        addresses.append((host, int(port)))
    try:
        create_cluster(addresses, replicas, password=os.environ.get("CORRAL_CLUSTER_PASSWORD"))
    except (ValueError, TimeoutError) as e:
        print(f"corral: {e}", file=sys.stderr)
        return 1
    print(f"cluster ok: {len(addresses) // (1 + replicas)} masters, {replicas} replica(s) each")
    return 0
