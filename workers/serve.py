"""Start one worker process from Settings: load the model, build the engine, run the loop."""

from __future__ import annotations

import asyncio
import logging
import signal

from broker.connection import connect, resolve_redis_url
from broker.keys import Keys
from broker.registry import WorkerRegistry
from broker.schemas import ModelMetadata
from broker.settings import Settings
from workers.engine import Engine
from workers.profiles import Profile, parse_profiles
from workers.runtime import ENGINE_DIED_EXIT, EngineDied, Worker
from workers.upstream import Upstream, UpstreamEngine, UpstreamFrontend

log = logging.getLogger(__name__)


async def serve(settings: Settings) -> None:
    url = resolve_redis_url(settings)
    redis = connect(url)
    worker = await (upstream_worker if settings.upstream_url else model_worker)(settings, redis)
    # The heartbeat on a client of its own: it runs beside the loop, and one cluster client's
    # commands must not run at once (broker/queue.py: _per_node).
    worker.beats = WorkerRegistry(connect(url), worker.keys)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    if settings.fault_injection and hasattr(worker.engine, "fail_next_step"):
        loop.add_signal_handler(signal.SIGUSR2, worker.engine.fail_next_step)
    try:
        await worker.run()
    except EngineDied:
        # Its requests are handed back and it has deregistered: a supervisor starts a new one.
        raise SystemExit(ENGINE_DIED_EXIT) from None
    finally:
        await redis.aclose()
        await worker.beats.redis.aclose()


def _builtin_metadata(model: str) -> dict:
    from workers.loading import builtin_metadata

    return builtin_metadata(model)


def _runtime_options(settings: Settings) -> dict:
    own = {} if settings.upstream_url else _builtin_metadata(settings.model)
    return {
        "model": settings.model_name,
        "worker_id": settings.worker_id,
        "heartbeat_s": settings.heartbeat_s,
        "worker_ttl_s": settings.worker_ttl_s,
        "max_attempts": settings.max_attempts,
        "unheard_grace_s": settings.unheard_grace_s,
        "drain_timeout_s": settings.drain_timeout_s,
        "engine_stall_s": settings.engine_stall_s,
        "metadata": ModelMetadata.model_validate({**own, **settings.model_metadata()}),
    }


def _profiles(settings: Settings, adapters: dict) -> dict[str, Profile]:
    return parse_profiles(settings.profiles, settings.model_name, taken={settings.model_name, *adapters})


async def model_worker(settings: Settings, redis) -> Worker:
    # torch and transformers: only a model's worker loads them.
    from workers.loading import Placement, load_model
    from workers.lora import parse_specs
    from workers.sequence import TokenFrontend

    loaded = await asyncio.to_thread(
        load_model,
        settings.model,
        settings.home,
        device=settings.device,
        dtype=settings.dtype,
        threads=settings.threads,
        chat_template=settings.chat_template,
        load_8bit=settings.load_8bit,
        load_4bit=settings.load_4bit,
        placement=Placement(settings.num_gpus, settings.max_gpu_memory, settings.cpu_offloading),
    )
    adapters = parse_specs(settings.lora)
    profiles = _profiles(settings, adapters)
    engine = build_engine(settings, loaded, adapters)
    described = {
        name: ModelMetadata.model_validate(
            {"description": f"LoRA adapter {path.name} on {settings.model_name}", **settings.model_info(name)}
        )
        for name, path in adapters.items()
    }
    frontend = TokenFrontend(
        loaded.tokenizer, loaded.stops, frozenset(adapters), settings.model_name, settings.tool_parser
    )
    return Worker(
        engine,
        frontend,
        redis,
        Keys(settings.key_prefix),
        device=loaded.device,
        adapters=described,
        profiles=profiles,
        **_runtime_options(settings),
    )


def build_engine(settings: Settings, loaded, adapters: dict) -> Engine:
    """Continuous batching where transformers can run the model that way, else the one-at-a-time
    decode loop, saying why at start."""
    from workers.generate_engine import GenerateEngine
    from workers.hf_engine import TransformersEngine

    reason = loaded.unbatchable
    if settings.engine == "generate":
        reason = "--engine generate"
    elif reason is not None and settings.engine == "continuous":
        raise ValueError(f"--engine continuous cannot run this model: {reason}")
    if reason is None:
        try:
            return TransformersEngine(
                loaded,
                max_batch=settings.max_batch,
                kv_cache_tokens=settings.kv_cache_tokens,
                max_batch_tokens=settings.max_batch_tokens,
                adapters=adapters,
                prefill_tokens_while_decoding=settings.prefill_tokens_while_decoding,
                batch_invariant=settings.batch_invariant,
            )
        except (RuntimeError, ValueError, NotImplementedError, TypeError) as e:
            if settings.engine == "continuous":
                raise
            reason = f"continuous batching could not start: {type(e).__name__}: {e}"
    return GenerateEngine(loaded, reason, adapters, batch_invariant=settings.batch_invariant)


async def upstream_worker(settings: Settings, redis) -> Worker:
    key = settings.upstream_api_key
    upstream = Upstream(
        base_url=settings.upstream_url or "",
        model=settings.upstream_model or settings.model_name,
        api_key=key.get_secret_value() if key else None,
        extra_body=settings.upstream_extra_body,
        timeout_s=settings.upstream_timeout_s,
    )
    log.info("forwarding %s to %s as %s", settings.model_name, upstream.base_url, upstream.model)
    engine = UpstreamEngine(upstream, max_batch=settings.max_batch)
    options = _runtime_options(settings)
    # An upstream may think for minutes before its first token; its own timeout governs.
    options["engine_stall_s"] = float("inf")
    return Worker(
        engine,
        UpstreamFrontend(upstream),
        redis,
        Keys(settings.key_prefix),
        device="api",
        profiles=_profiles(settings, {}),
        **options,
    )


def main(settings: Settings | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop

        run = uvloop.run
    except ImportError:  # Windows
        run = asyncio.run
    try:
        run(serve(settings or Settings()))
    except ValueError as e:  # a setting that cannot work (MissingExtra too): say which, no traceback
        log.error("%s", e)
        raise SystemExit(2) from None
