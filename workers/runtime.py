"""The worker runtime: claim → admit → step → publish → ack, around any Engine."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from dataclasses import replace

import redis.asyncio as aioredis

from broker.connection import UNAVAILABLE
from broker.keys import LANES, Keys
from broker.progress import GRACE_MS, ChoiceProgress, ProgressUpdate
from broker.pubsub import ShardedSubscription
from broker.queue import Claimed, RequestQueue
from broker.registry import WorkerRegistry
from broker.schemas import Event, ModelMetadata, WorkerInfo, now_ms
from workers.engine import Choice, Engine, Frontend
from workers.profiles import Profile
from workers.sequence import InvalidPrompt, rejection

log = logging.getLogger(__name__)

# How long an idle worker blocks on its stream before it looks at its stop flag again.
_IDLE_BLOCK_MS = 1000
# Retry pace while Redis is unreachable.
_BACKOFF_MIN_S = 0.1
# Short: a failover lasts a few seconds, and every second of backoff past its end is a second
# of stalled streams (a refused connection costs nothing to try again).
_BACKOFF_MAX_S = 0.5
# How long a busy worker waits for engine output before it checks deadlines again.
_STEP_WAIT_S = 0.5
# Cancels of requests not (yet) running here that are remembered before old ones are pruned.
_EARLY_CANCELS_MAX = 10_000
# Exit status of a worker whose engine died: a supervisor (corral up, compose) starts it again.
ENGINE_DIED_EXIT = 3


class EngineDied(Exception):
    """The engine stopped working (its thread died, or it made no step for too long). The
    worker hands its requests back and exits; it never publishes the engine's last errors."""


def new_worker_id() -> str:
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"


class Worker:
    def __init__(
        self,
        engine: Engine,
        frontend: Frontend,
        redis: aioredis.Redis,
        keys: Keys,
        model: str,
        device: str,
        worker_id: str | None = None,
        heartbeat_s: float = 1.0,
        worker_ttl_s: float = 5.0,
        max_attempts: int = 3,
        unheard_grace_s: float = 30.0,
        drain_timeout_s: float = 30.0,
        engine_stall_s: float = 120.0,
        metadata: ModelMetadata | None = None,
        adapters: dict[str, ModelMetadata] | None = None,
        profiles: dict[str, Profile] | None = None,
    ) -> None:
        self.metadata = metadata or ModelMetadata()
        # LoRA adapters served beside the model, each under its own name, with their metadata.
        self.adapters = adapters or {}
        # Profiles of the model (its weights under another name, with their own system prompt
        # and sampling preset).
        self.profiles = profiles or {}
        self.names_metadata = {
            **self.adapters,
            **{name: profile.metadata(self.metadata, model) for name, profile in self.profiles.items()},
        }
        self.engine = engine
        self.frontend = frontend
        self.redis = redis
        self.keys = keys
        self.queue = RequestQueue(redis, keys)
        self.registry = WorkerRegistry(redis, keys)
        # Where the heartbeat task writes: the same client unless given one of its own (which a
        # cluster client wants: see workers/serve.py).
        self.beats = self.registry
        self.model = model
        self.models = (model, *self.adapters, *self.profiles)
        self.device = device
        self.worker_id = worker_id or new_worker_id()
        self.heartbeat_s = heartbeat_s
        self.worker_ttl_s = worker_ttl_s
        self.unheard_grace_s = unheard_grace_s
        # A request whose worker died more often than this ends with an error.
        self.max_attempts = max_attempts
        self.drain_timeout_s = drain_timeout_s
        # An engine with work that yields nothing this long is taken for dead.
        self.engine_stall_s = engine_stall_s
        self._last_output_at = time.monotonic()
        self._drain_until = float("inf")
        # Choices being generated, by engine id; and choices left per request id.
        self.active: dict[str, Choice] = {}
        self.open: dict[str, int] = {}
        # Choices that finished this step: their last progress is still to be written.
        self._finished: dict[str, Choice] = {}
        self._next_reclaim = 0.0
        # Kept across a Redis outage: events not yet published, requests not yet acked.
        self._unpublished: list[tuple[str, Event]] = []
        self._unacked: list[Claimed] = []
        # Events to send again: sent and heard by nobody, or not sent (their shard unreachable);
        # and since when each request's events have been sent to nobody.
        self._unheard: dict[str, list[Event]] = {}
        self._unheard_since: dict[str, float] = {}
        self._nobody_heard: set[str] = set()
        self._unadmitted: list[Claimed] = []
        # While the shard of a served model's queue is unreachable, claims wait until then.
        self._claim_again_at = 0.0
        self._claim_backoff_s = _BACKOFF_MIN_S
        self.started_at = time.time()
        self.tokens_out = 0
        # Cancels of requests not running here (yet): one claimed now may be between its marker
        # check and its start. Kept a minute.
        self._cancelled_early: dict[str, float] = {}
        self.cancelled = 0
        self.tokens_wasted = 0
        self.requests_done = 0
        self.reclaimed = 0
        self.tokens_per_s = 0.0  # over the last heartbeat interval
        self._stopping = asyncio.Event()

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        for model in self.models:
            await self.queue.ensure_group(model)
        self.engine.start()
        await self.warmup()
        await self.beat()
        side_tasks = [asyncio.create_task(self._heartbeat()), asyncio.create_task(self._listen_for_cancels())]
        log.info("worker %s serving %s on %s", self.worker_id, ", ".join(self.models), self.device)
        backoff_s = _BACKOFF_MIN_S
        try:
            while not (self._stopping.is_set() and not self.active):
                if time.monotonic() >= self._drain_until:
                    await self.hand_back()
                    break
                try:
                    await self.iterate()
                    backoff_s = _BACKOFF_MIN_S
                except EngineDied as e:
                    log.error("the engine died (%s): handing back %d requests and exiting", e, len(self.open))
                    await self.hand_back()
                    raise
                except UNAVAILABLE as e:
                    # The engine keeps generating; its output waits in the engine, and what was
                    # not published or acked waits here, until Redis answers again.
                    log.warning("redis unreachable (%s); retrying in %.1fs", e, backoff_s)
                    await asyncio.sleep(backoff_s)
                    backoff_s = min(backoff_s * 2, _BACKOFF_MAX_S)
        finally:
            for task in side_tasks:
                task.cancel()
            await asyncio.gather(*side_tasks, return_exceptions=True)
            with contextlib.suppress(aioredis.RedisError, ConnectionError):
                await self.registry.remove(self.worker_id)
            self.engine.stop()
            log.info("worker %s stopped", self.worker_id)

    async def iterate(self) -> None:
        """One turn of the loop: claim → admit → step → publish → ack."""
        self.check_engine()
        # Claimed requests wait here until admitted: a failure while admitting (Redis away) must
        # not lose them, for they are pending on this live worker and nobody else takes them.
        self._unadmitted = self._unadmitted + await self.claim_if_reachable()
        events, done = await self.admit(self._unadmitted)
        outputs = await self.engine.step(_STEP_WAIT_S if self.active else 0)
        self.check_engine(outputs)
        events += self.collect(outputs, done)
        events += self.expire_overdue(done)
        self._unpublished += events
        self._unacked += done
        await self.publish()
        acking, self._unacked = self._unacked, []
        try:
            await self.ack(acking)
        except UNAVAILABLE as e:  # the queue's shard is away: acked on a later turn
            self._unacked = acking + self._unacked
            log.warning("ack failed (%s); again next turn", e)
        await self.drop_unheard()

    async def claim_if_reachable(self) -> list[Claimed]:
        """`claim`, unless the queue's shard was unreachable a moment ago: then nothing, while
        the requests in flight go on streaming to the gateways that can be reached."""
        if time.monotonic() < self._claim_again_at:
            return []
        try:
            claimed = await self.claim()
        except UNAVAILABLE as e:
            if not self.active:
                raise  # nothing else to do: the run loop waits and tries again
            log.warning("claim failed (%s); again in %.1fs", e, self._claim_backoff_s)
            self._claim_again_at = time.monotonic() + self._claim_backoff_s
            self._claim_backoff_s = min(self._claim_backoff_s * 2, _BACKOFF_MAX_S)
            return []
        self._claim_backoff_s = _BACKOFF_MIN_S
        return claimed

    async def warmup(self) -> None:
        """The frontend's warm-up, before the worker registers (a first request's set-up is never
        paid by a client)."""
        await self.frontend.warmup(self.engine)

    def check_engine(self, outputs: list | None = None) -> None:
        """Raises EngineDied if the engine's thread is gone, or it has had work and yielded
        nothing for `engine_stall_s`. A dead engine's final outputs (an error for every request)
        are never published: the requests go to a live worker instead."""
        if outputs or not self.active:
            self._last_output_at = time.monotonic()
        trouble = self.engine_trouble()
        if trouble is not None:
            raise EngineDied(trouble)

    def engine_trouble(self) -> str | None:
        """Why the engine cannot serve, or None when it can (also reported by the heartbeat)."""
        if not self.engine.alive():
            return "its thread is not running"
        if self.active and time.monotonic() - self._last_output_at > self.engine_stall_s:
            return f"no step in {self.engine_stall_s:.0f}s with {len(self.active)} requests"
        return None

    def stop(self) -> None:
        """Stop claiming; `run` returns once the requests in flight are done, or after the
        drain timeout, handing back what is still running."""
        if not self._stopping.is_set():
            self._drain_until = time.monotonic() + self.drain_timeout_s
        self._stopping.set()

    async def hand_back(self) -> None:
        """Leave the requests still running pending, unacked: their progress is in Redis, and
        once this worker has deregistered a live one reclaims and continues them."""
        handed = {sequence.request_id for sequence in self.active.values()}
        if self.engine.alive():
            for engine_id in list(self.active):
                self.engine.cancel(engine_id)
        self.active.clear()
        self.open.clear()
        log.info("handed back %d requests", len(handed))

    async def claim(self) -> list[Claimed]:
        """New requests, and requests of dead workers, up to the free batch slots."""
        if self._stopping.is_set():
            return []
        free = self.engine.max_batch - len(self.active)
        reclaimed = await self.reclaim(free) if time.monotonic() >= self._next_reclaim else []
        free -= len(reclaimed)
        if self.active or reclaimed:
            # Batch work only takes the slots interactive work leaves free.
            claimed = await self.queue.claim(self.models, self.worker_id, free, None, ("interactive",))
            batch = await self.queue.claim(self.models, self.worker_id, free - len(claimed), None, ("batch",))
            return reclaimed + claimed + batch
        return await self.queue.claim(self.models, self.worker_id, free, _IDLE_BLOCK_MS, LANES)

    async def reclaim(self, free: int) -> list[Claimed]:
        self._next_reclaim = time.monotonic() + self.worker_ttl_s / 2
        live = {w.worker_id for w in await self.registry.live()} | {self.worker_id}
        min_idle_ms = int(self.worker_ttl_s * 1000)
        claimed: list[Claimed] = []
        for model in self.models:
            consumers = await self.queue.consumers(model)
            for name in [c for c, pending in consumers.items() if c not in live and not pending]:
                await self.queue.forget_consumer(model, name)  # a stopped worker's empty entry
            dead = {c for c, pending in consumers.items() if c not in live and pending}
            claimed += await self.queue.reclaim(model, self.worker_id, dead, free - len(claimed), min_idle_ms)
        self.reclaimed += len(claimed)
        for item in claimed:
            log.info("reclaimed %s from a dead worker", item.request.request_id)
        return claimed

    async def admit(self, claimed: list[Claimed]) -> tuple[list[tuple[str, Event]], list[Claimed]]:
        """Start what was claimed. Returns the events to publish now and the requests already
        over: tokenizer requests, requests that cannot run, resumed requests with nothing left.
        What cannot be checked now stays in `_unadmitted` for the next turn."""
        if not claimed:
            return [], []
        # Requests whose clients left while they waited never start: they are acked at once.
        # One whose marker's node is unreachable (a cluster mid-failover) starts: a cancel that
        # came meanwhile still stops it (the broadcast, or its gateway hearing it unwanted).
        # A takeover whose progress cannot be read yet waits for a later turn.
        cancelled, _ = await self.queue.cancelled([c.request.request_id for c in claimed])
        self.cancelled += len(cancelled)
        done: list[Claimed] = [c for c in claimed if c.request.request_id in cancelled]
        claimed = [c for c in claimed if c.request.request_id not in cancelled]
        unknown: set[str] = set()
        progress: dict[str, dict[int, ChoiceProgress] | Event] = {}
        for item in [c for c in claimed if c.reclaimed]:
            try:
                progress[item.request.request_id] = await self._attempt(item)
            except UNAVAILABLE:
                unknown.add(item.request.request_id)
        self._unadmitted = [c for c in self._unadmitted if c.request.request_id in unknown]
        claimed = [c for c in claimed if c.request.request_id not in unknown]
        # Chat templates and tokenizing are CPU work: keep them off the event loop.
        prepared = await asyncio.to_thread(self._prepare, claimed, progress)
        events: list[tuple[str, Event]] = []
        for item, result in zip(claimed, prepared, strict=True):
            request_id = item.request.request_id
            if self._cancelled_early.pop(request_id, None) is not None:  # cancelled while prepared
                self.cancelled += 1
                done.append(item)
                continue
            if isinstance(result, Event):
                events.append((request_id, result))
                done.append(item)
                continue
            self.open[request_id] = len(result)
            if not result:  # every choice had finished before its worker died
                del self.open[request_id]
                done.append(item)
            for sequence in result:
                self.active[sequence.engine_id] = sequence
                if sequence.params.max_new_tokens <= 0:  # resumed with its whole budget spent
                    events.append((request_id, sequence.finish("length")))
                    done += self._release(sequence)
                else:
                    self.engine.add(sequence.engine_id, sequence.engine_prompt, sequence.params)
        return events, done

    async def _attempt(self, item: Claimed) -> dict[int, ChoiceProgress] | Event:
        """Count a reclaimed request's attempt; its progress, or the error that ends it."""
        request = item.request
        attempts = await self.queue.count_attempt(request.request_id, request.deadline_ms + GRACE_MS)
        if attempts > self.max_attempts:
            return rejection("worker_lost", f"the request's worker died {attempts} times; giving up")
        return await self.queue.progress(request.request_id)

    def _prepare(
        self, claimed: list[Claimed], progress: dict[str, dict[int, ChoiceProgress] | Event]
    ) -> list[list[Choice] | Event]:
        prepared: list[list[Choice] | Event] = []
        at_ms = now_ms()
        for item in claimed:
            earlier = progress.get(item.request.request_id, {})
            if isinstance(earlier, Event):
                prepared.append(earlier)
            elif item.request.expired(at_ms):
                prepared.append(rejection("deadline_exceeded", "the request's deadline passed in the queue"))
            else:
                prepared.append(self._start(item, earlier))
        return prepared

    def _start(self, item: Claimed, earlier: dict[int, ChoiceProgress]) -> list[Choice] | Event:
        try:
            profile = self.profiles.get(item.request.model)
            if profile is not None:
                item = replace(item, request=profile.apply(item.request))
            if item.request.kind != "generate":
                return self.frontend.answer(item, self.engine)
            new_choice = self.frontend.choices(item, self.engine)
            choices = []
            for index in range(item.request.n):
                choice = new_choice(index)
                done_before = earlier.get(index)
                if done_before is not None:
                    if done_before.done:
                        continue
                    choice.resume(done_before)
                choices.append(choice)
            return choices
        except InvalidPrompt as e:
            return rejection(e.code, str(e))
        except Exception as e:  # one bad request must never take the worker down
            log.exception("could not start %s", item.request.request_id)
            return rejection("engine_error", f"{type(e).__name__}: {e}")

    def collect(self, outputs: list, done: list[Claimed]) -> list[tuple[str, Event]]:
        """Events for this step's outputs; requests that finished are added to `done`."""
        events: list[tuple[str, Event]] = []
        for out in outputs:
            sequence = self.active.get(out.request_id)
            if sequence is None:
                continue
            self.tokens_out += len(out.new_token_ids) + out.completion_tokens
            events += [(sequence.request_id, e) for e in sequence.advance(out)]
            if sequence.finished:
                if not out.finished:  # a stop string ended it before the engine did
                    self.engine.cancel(sequence.engine_id)
                done += self._release(sequence)
        return events

    def expire_overdue(self, done: list[Claimed]) -> list[tuple[str, Event]]:
        at_ms = now_ms()
        events = []
        for sequence in [s for s in self.active.values() if s.claimed.request.expired(at_ms)]:
            self.engine.cancel(sequence.engine_id)
            events.append(
                (sequence.request_id, sequence.fail("deadline_exceeded", "the request's deadline passed"))
            )
            done += self._release(sequence)
        return events

    def progress(self, events: list[tuple[str, Event]]) -> tuple[dict[str, ProgressUpdate], list]:
        """Where each choice that published this turn stands, for a worker that may take over;
        and the (sequence, tokens recorded) marks to set once that is written."""
        updates: dict[str, ProgressUpdate] = {}
        marks = []
        recorded: set[Choice] = set()
        for request_id, event in events:
            engine_id = f"{request_id}/{event.index}"
            sequence = self.active.get(engine_id) or self._finished.get(engine_id)
            if sequence is not None and sequence not in recorded:
                recorded.add(sequence)
                marks.append((sequence, sequence.record(updates.setdefault(request_id, ProgressUpdate()))))
        return updates, marks

    def _release(self, sequence: Choice) -> list[Claimed]:
        """Forget a finished choice; the request once its last choice is done."""
        del self.active[sequence.engine_id]
        self._finished[sequence.engine_id] = sequence
        self.open[sequence.request_id] -= 1
        if self.open[sequence.request_id] > 0:
            return []
        del self.open[sequence.request_id]
        self.requests_done += 1
        return [sequence.claimed]

    async def ack(self, done: list[Claimed]) -> None:
        for model in self.models:
            for lane in LANES:
                here = [c for c in done if c.lane == lane and c.request.model == model]
                entries, requests = [c.entry_id for c in here], [c.request.request_id for c in here]
                await self.queue.ack(model, entries, requests, lane)

    async def publish(self) -> None:
        """This turn's events, after any earlier ones still unheard (so each request's events
        leave in seq order), with the progress the new ones made."""
        retries = [(request_id, e) for request_id, events in self._unheard.items() for e in events]
        outgoing = retries + self._unpublished
        updates, marks = self.progress(self._unpublished)
        published = await self.queue.publish(outgoing, updates)
        for sequence, recorded in marks:
            if sequence.request_id not in published.unrecorded:
                sequence.recorded = recorded  # else recorded again with the next tokens
        self._finished.clear()
        self._unpublished = []
        unheard: dict[str, list[Event]] = {}
        self._nobody_heard = set()
        for (request_id, event), heard in zip(outgoing, published.heard, strict=True):
            if not heard:
                unheard.setdefault(request_id, []).append(event)
            if heard is False:
                self._nobody_heard.add(request_id)
        self._unheard = unheard

    @property
    def unheard(self) -> frozenset[str]:
        """The requests whose events were last sent to nobody: each turn sends them again."""
        return frozenset(self._nobody_heard)

    async def drop_unheard(self) -> None:
        """Give up on requests whose events no gateway has received for `unheard_grace_s` (it
        died, or was restarted), cancelling those still running; a shorter gap is forgiven (a
        gateway resubscribing after a Redis restart or failover) and the events are sent again.
        Events that could not be sent at all do not count: they wait for their shard."""
        now = time.monotonic()
        for request_id in [r for r in self._unheard_since if r not in self._nobody_heard]:
            del self._unheard_since[request_id]
        for request_id in [r for r in self._unheard if r in self._nobody_heard]:
            since = self._unheard_since.setdefault(request_id, now)
            if now - since >= self.unheard_grace_s:
                log.info("no gateway listens for %s any more", request_id)
                del self._unheard_since[request_id], self._unheard[request_id]
                await self._cancel(request_id)

    # ------------------------------------------------------------------ side tasks

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            worker_id=self.worker_id,
            models=list(self.models),
            device=self.device,
            max_batch=self.engine.max_batch,
            in_flight=len(self.open),
            requests_done=self.requests_done,
            reclaimed=self.reclaimed,
            tokens_per_s=round(self.tokens_per_s, 2),
            tokens_out=self.tokens_out,
            cancelled=self.cancelled,
            tokens_wasted=self.tokens_wasted,
            engine_alive=self.engine_trouble() is None,
            context_length=self.engine.context_length,
            started_at=self.started_at,
            metadata=self.metadata,
            model_metadata=self.names_metadata,
        )

    async def beat(self) -> None:
        await self.beats.beat(self.info(), self.worker_ttl_s)

    async def _heartbeat(self) -> None:
        last_tokens, last_t = self.tokens_out, time.monotonic()
        while True:
            await asyncio.sleep(self.heartbeat_s)
            now = time.monotonic()
            self.tokens_per_s = (self.tokens_out - last_tokens) / max(now - last_t, 1e-6)
            last_tokens, last_t = self.tokens_out, now
            try:
                await self.beat()
            except (aioredis.RedisError, *UNAVAILABLE) as e:
                log.warning("heartbeat failed: %s", e)

    async def _listen_for_cancels(self) -> None:
        """Reads every served name's cancel channel (on a cluster, each on its own shard)."""
        await asyncio.gather(*(self._listen_for_cancels_of(model) for model in self.models))

    async def _listen_for_cancels_of(self, model: str) -> None:
        subscription = ShardedSubscription(self.redis, self.keys.cancel(model), f"cancel channel of {model}")
        try:
            async for request_id in subscription.messages():
                await self._cancel(request_id)
        finally:
            await subscription.aclose()

    async def _cancel(self, request_id: str) -> None:
        if request_id not in self.open:
            now = time.monotonic()
            self._cancelled_early[request_id] = now
            if len(self._cancelled_early) > _EARLY_CANCELS_MAX:
                self._cancelled_early = {r: t for r, t in self._cancelled_early.items() if now - t < 60}
            return
        done: list[Claimed] = []
        for sequence in [s for s in self.active.values() if s.request_id == request_id]:
            self.engine.cancel(sequence.engine_id)
            self.tokens_wasted += sequence.completion_tokens
            done += self._release(sequence)
        self.cancelled += 1
        self._unacked += done  # acked by the loop's next turn
        log.info("cancelled %s", request_id)
