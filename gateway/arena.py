"""The arena over HTTP: battles between two models (anonymous or named), each turn streamed from
both sides at once, one vote per battle, votes on single-model chats, the conversation-log
export, and the leaderboard the ratings job computes."""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

import orjson
from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from broker.arena import (
    SIDES,
    AlreadyVoted,
    ArenaStore,
    Battle,
    BattleMode,
    BattlePublic,
    BattleVote,
    Busy,
    ChatVote,
    Side,
    Turn,
    feedback_log_record,
)
from broker.jobs import RatingsParams
from broker.queue import QueueFull
from broker.schemas import ChatMessage, Sampling
from gateway.auth import Admin, Caller, Limited, LimitsDep, Principal, caller
from gateway.calls import Call, metadata_of, new_request, require_worker, sse
from gateway.errors import APIError, Backlogged, InvalidRequest, ModelNotFound
from gateway.state import Gateway, GatewayDep

router = APIRouter(prefix="/v1", dependencies=[Depends(caller)])


class BattleNotFound(APIError):
    status = 404

    def __init__(self, battle_id: str) -> None:
        super().__init__(
            f"No battle '{battle_id}' (it never existed, or nobody played it for a day).",
            param="battle_id",
            code="battle_not_found",
        )


class Conflict(APIError):
    status = 409


class ArenaUnavailable(APIError):
    status = 503
    type = "server_error"


class VoteLimited(APIError):
    status = 429
    type = "rate_limit_error"

    def __init__(self, per_hour: int, retry_after_s: int) -> None:
        super().__init__(
            f"Vote limit reached: {per_hour} votes per hour. Retry in {retry_after_s}s.",
            code="vote_limit_exceeded",
        )
        self.headers = {"Retry-After": str(retry_after_s)}


class BattleCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: BattleMode = "anonymous"
    # Named battles only: the left and right model.
    models: tuple[str, str] | None = None


class TurnCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    content: str = Field(min_length=1)
    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(512, gt=0)

    def defaulted(self) -> list[str]:
        """The sampling fields the player left out, which a served profile fills with its preset."""
        given = self.model_fields_set
        renamed = {"temperature": "temperature", "top_p": "top_p", "max_tokens": "max_new_tokens"}
        return [field for name, field in renamed.items() if name not in given]


class VoteCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    vote: BattleVote


# A vote's conversation: what one chat could hold (the UI sends the whole chat it shows).
_FEEDBACK_MAX_MESSAGES = 201
_FEEDBACK_MAX_CHARS = 200_000


class FeedbackMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=_FEEDBACK_MAX_CHARS)


class FeedbackCreate(BaseModel):
    """A vote on a single-model chat, with the conversation it is about."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1)
    messages: list[FeedbackMessage] = Field(min_length=2, max_length=_FEEDBACK_MAX_MESSAGES)
    vote: ChatVote
    # The client's id for this conversation, so votes on one chat can be grouped.
    chat_id: str | None = Field(None, max_length=100)


# --------------------------------------------------------------------------- battles


async def _draw_pair(gateway: Gateway) -> tuple[str, str]:
    """Two distinct live models, each drawn by its weight, in random left/right order."""
    served = sorted(await gateway.models.get(refresh=True))
    weights = gateway.settings.arena_weights
    candidates = [m for m in served if weights.get(m, 1.0) > 0]
    if len(candidates) < 2:
        raise ArenaUnavailable(
            f"An anonymous battle needs two models with live workers; {len(candidates)} can battle "
            f"now ({', '.join(candidates) or 'none'}).",
            code="not_enough_models",
        )
    first = random.choices(candidates, [weights.get(m, 1.0) for m in candidates])[0]
    rest = [m for m in candidates if m != first]
    second = random.choices(rest, [weights.get(m, 1.0) for m in rest])[0]
    pair = [first, second]
    random.shuffle(pair)
    return pair[0], pair[1]


@router.post("/arena/battles")
async def create_battle(body: BattleCreate, gateway: GatewayDep, who: Limited) -> BattlePublic:
    if body.mode == "named":
        if body.models is None:
            raise InvalidRequest("a named battle needs `models`: [left, right]", param="models")
        for model in body.models:
            await require_worker(gateway, model)
        models = body.models
    else:
        if body.models is not None:
            raise InvalidRequest(
                "an anonymous battle draws its own models; leave `models` out", param="models"
            )
        models = await _draw_pair(gateway)
    battle = await gateway.arena.create(body.mode, models, who.id)
    return await _shown(gateway, battle)


async def _shown(gateway: Gateway, battle: Battle) -> BattlePublic:
    """The battle as its player may see it, with the models' metadata once they are revealed."""
    public = battle.public()
    if public.models is None:
        return public
    served = await gateway.models.get()
    return public.model_copy(
        update={"model_info": [metadata_of(m, served.get(m, [])) for m in public.models]}
    )


async def _battle(arena: ArenaStore, battle_id: str, who: Principal) -> Battle:
    """The battle, if `who` may see it: its player, or an admin. Another's is not found, so a
    battle's existence tells nothing."""
    battle = await arena.get(battle_id)
    if battle is None or (battle.user != who.id and not who.admin):
        raise BattleNotFound(battle_id)
    return battle


@router.get("/arena/battles/{battle_id}")
async def get_battle(battle_id: str, gateway: GatewayDep, who: Caller) -> BattlePublic:
    return await _shown(gateway, await _battle(gateway.arena, battle_id, who))


def _check_turn(gateway: Gateway, battle: Battle, body: TurnCreate) -> None:
    settings = gateway.settings
    if battle.vote is not None:
        raise Conflict("This battle has been voted on; start a new one.", code="battle_voted")
    if len(body.content) > settings.arena_max_input_chars:
        raise InvalidRequest(
            f"The prompt has {len(body.content)} characters; the arena takes at most "
            f"{settings.arena_max_input_chars}.",
            param="content",
            code="input_too_long",
        )
    if len(battle.turns) >= settings.arena_max_turns:
        raise InvalidRequest(
            f"This battle has reached its {settings.arena_max_turns} turns; vote or start a new one.",
            code="conversation_limit",
        )
    if body.max_tokens > settings.max_tokens_limit:
        raise InvalidRequest(
            f"max_tokens is {body.max_tokens}; this server allows at most {settings.max_tokens_limit}",
            param="max_tokens",
            code="invalid_value",
        )


@router.post("/arena/battles/{battle_id}/turns")
async def play_turn(
    battle_id: str, body: TurnCreate, gateway: GatewayDep, who: Caller, limits: LimitsDep
) -> StreamingResponse:
    """Streams both sides' answers as server-sent events: `{"side", "text"}` deltas, a
    `{"side", "finish_reason"}` per side, then `{"turn": N, "done": true}` once the turn is
    recorded (or `{"side", "error"}`, and the turn is not recorded)."""
    battle = await _battle(gateway.arena, battle_id, who)
    _check_turn(gateway, battle, body)
    await limits.admit(who.id)
    for model in battle.models:
        await require_worker(gateway, model)
    timeout_s = gateway.settings.request_timeout_s
    try:
        await gateway.arena.begin_turn(battle_id, timeout_s)
    except Busy:
        raise Conflict("A turn of this battle is still being generated.", code="battle_busy") from None
    calls: list[Call] = []
    try:
        for side, model in zip(SIDES, battle.models, strict=True):
            messages = [ChatMessage(**m) for m in battle.messages(side)]
            messages.append(ChatMessage(role="user", content=body.content))
            request = new_request(
                gateway,
                model=model,
                messages=messages,
                sampling=Sampling(temperature=body.temperature, top_p=body.top_p),
                max_new_tokens=body.max_tokens,
                defaulted=body.defaulted(),
            )
            call = Call(gateway, request, "arena", who.id)
            calls.append(call)
            await call.enqueue(gateway.settings.max_backlog)
    except QueueFull as e:
        calls[-1].finished = True  # never queued
        _release(calls)
        await gateway.arena.end_turn(battle_id)
        raise Backlogged(calls[-1].request.model, e.waiting) from None
    except BaseException:
        _release(calls)
        await gateway.arena.end_turn(battle_id)
        raise
    return StreamingResponse(_stream_turn(gateway.arena, battle, body, calls), media_type="text/event-stream")


def _release(calls: list[Call]) -> None:
    for call in calls:
        call.release()


async def _pump(side: Side, call: Call, out: asyncio.Queue[Any]) -> None:
    """One side's events onto the shared queue, then None."""
    try:
        async for event in call.events():
            await out.put((side, event))
    except APIError as e:
        await out.put((side, e))
    finally:
        await out.put((side, None))


async def _stream_turn(
    arena: ArenaStore, battle: Battle, body: TurnCreate, calls: list[Call]
) -> AsyncIterator[bytes]:
    start = time.time()
    out: asyncio.Queue[Any] = asyncio.Queue()
    sides: tuple[Side, Side] = ("left", "right")
    pumps = [asyncio.create_task(_pump(side, call, out)) for side, call in zip(sides, calls, strict=True)]
    texts: dict[str, list[str]] = {"left": [], "right": []}
    finish: dict[str, str] = {}
    read: dict[str, int] = {}  # each side's prompt tokens
    failed = False
    try:
        running = 2
        while running:
            side, item = await out.get()
            if item is None:
                running -= 1
            elif isinstance(item, APIError) or item.type == "error":
                code, message = (
                    (item.code, item.message)
                    if isinstance(item, APIError)
                    else (item.error.code, item.error.message)
                )
                failed = True
                yield sse({"side": side, "error": {"code": code, "message": message}})
            else:
                if item.text:
                    texts[side].append(item.text)
                    yield sse({"side": side, "text": item.text})
                if item.type == "done":
                    finish[side] = item.finish_reason or "stop"
                    read[side] = item.usage.prompt_tokens if item.usage else 0
                    calls[sides.index(side)].count("ok", item.usage)
                    yield sse({"side": side, "finish_reason": finish[side]})
        if not failed:
            turn = Turn(
                prompt=body.content,
                left="".join(texts["left"]),
                right="".join(texts["right"]),
                finish=(finish.get("left", "stop"), finish.get("right", "stop")),
                prompt_tokens=(read.get("left", 0), read.get("right", 0)),
                gen_params={
                    "temperature": body.temperature,
                    "top_p": body.top_p,
                    "max_new_tokens": body.max_tokens,
                },
                start=start,
                finish_at=time.time(),
            )
            played = await arena.add_turn(battle, turn)
            yield sse({"turn": len(played.turns), "done": True})
        yield b"data: [DONE]\n\n"
    finally:
        for task in pumps:
            task.cancel()
        _release(calls)
        await arena.end_turn(battle.id)


async def _count_vote(gateway: Gateway, who: str) -> None:
    per_hour = gateway.settings.arena_votes_per_hour
    retry_after_s = await gateway.arena.count_vote(who, per_hour)
    if retry_after_s is not None:
        raise VoteLimited(per_hour, retry_after_s)


@router.post("/arena/battles/{battle_id}/vote")
async def vote(battle_id: str, body: VoteCreate, gateway: GatewayDep, who: Caller) -> BattlePublic:
    """Records the battle's one vote and reveals the models; only its player votes, and never
    while a turn is still streaming (the answers being judged must be whole)."""
    battle = await _battle(gateway.arena, battle_id, who)
    if battle.user != who.id:
        raise Conflict("Only the battle's player votes in it.", code="not_your_battle")
    if battle.vote is not None:
        raise Conflict("This battle has been voted on already.", code="already_voted")
    if not battle.turns:
        raise InvalidRequest("Nothing to vote on yet: play a turn first.", code="no_turns")
    if await gateway.arena.turn_running(battle_id):
        raise Conflict(
            "A turn of this battle is still being generated; vote when it ends.", code="battle_busy"
        )
    await _count_vote(gateway, who.id)
    try:
        voted = await gateway.arena.vote(battle, body.vote, who.id)
    except AlreadyVoted:
        raise Conflict("This battle has been voted on already.", code="already_voted") from None
    return await _shown(gateway, voted)


@router.post("/arena/feedback")
async def feedback(body: FeedbackCreate, gateway: GatewayDep, who: Limited) -> dict[str, Any]:
    """An up, down or flag vote on a single-model chat."""
    if not any(m.role == "assistant" for m in body.messages):
        raise InvalidRequest("The conversation has no assistant message to vote on.", param="messages")
    if body.model not in await gateway.models.get() and not await gateway.queue.known(body.model):
        raise ModelNotFound(body.model)
    if sum(len(m.content) for m in body.messages) > _FEEDBACK_MAX_CHARS:
        raise InvalidRequest(
            f"The conversation is over {_FEEDBACK_MAX_CHARS} characters.",
            param="messages",
            code="input_too_long",
        )
    await _count_vote(gateway, who.id)
    chat_id = body.chat_id or uuid.uuid4().hex
    messages = [m.model_dump() for m in body.messages]
    await gateway.arena.feedback(feedback_log_record(chat_id, body.model, messages, body.vote, who.id))
    return {"object": "arena.feedback", "chat_id": chat_id, "vote": body.vote}


@router.get("/arena/export")
async def export(
    gateway: GatewayDep, _: Admin, include: Literal["all", "votes"] = "all"
) -> StreamingResponse:
    """The arena's log as JSONL in FastChat's conversation-log shape (admins only): each battle
    turn as two `chat` records (unless include=votes), then every vote. The turns of an anonymous
    battle that is still open and unvoted are held back until its vote or its expiry: they name
    its models, and whoever read them could steer the vote."""

    async def lines() -> AsyncIterator[bytes]:
        if include == "all":
            async for record in gateway.arena.revealed_turn_log():
                yield _jsonl(record)
        async for record in gateway.arena.log():
            yield _jsonl(record)

    return StreamingResponse(lines(), media_type="application/x-ndjson")


def _jsonl(record: dict[str, Any]) -> bytes:
    """One export line. A record stored before text was checked at the edge may hold a lone
    surrogate, which orjson refuses: it is written with JSON's escape instead of failing."""
    try:
        return orjson.dumps(record) + b"\n"
    except orjson.JSONEncodeError:
        return json.dumps(record).encode() + b"\n"


# --------------------------------------------------------------------------- leaderboard


class UnknownCategory(APIError):
    status = 404


@router.get("/leaderboard")
async def get_leaderboard(
    gateway: GatewayDep,
    rank_rule: Literal["ub", "position"] | None = None,
    category: str = Query("overall", max_length=64),
) -> JSONResponse:
    """The latest leaderboard (rank, score, 95% interval, votes per model), as the ratings job
    last computed it, unrounded; an empty one before the first. `rank_rule` ranks by the other
    rule than the job's (both ranks are in every row); `category` gives that category's board
    (its names are in `categories`; an unknown one is a 404)."""
    stored = await gateway.redis.get(gateway.keys.leaderboard)
    if stored is None:
        return JSONResponse(
            {
                "object": "leaderboard",
                "computed_at": None,
                "data": [],
                "models": [],
                "win_fraction": [],
                "battle_count": [],
                "battles": 0,
            }
        )
    board = orjson.loads(stored)
    if category != "overall":
        chosen = (board.get("categories") or {}).get(category)
        if chosen is None:
            raise UnknownCategory(
                f"no category {category!r}; the leaderboard's `categories` name them", "category"
            )
        board.update(chosen, category=category)
    if rank_rule is not None and board["data"] and f"rank_{rank_rule}" in board["data"][0]:
        board["rank_rule"] = rank_rule
        for row in board["data"]:
            row["rank"] = row[f"rank_{rank_rule}"]
    served = await gateway.models.get()
    for row in board["data"]:  # what people know the models by, from their live workers
        row["metadata"] = metadata_of(row["model"], served.get(row["model"], []))
    return JSONResponse(board)


@router.post("/leaderboard/refresh", status_code=202)
async def refresh_leaderboard(gateway: GatewayDep, who: Admin) -> dict[str, Any]:
    """Queues a ratings job now (admins only); follow it at /v1/jobs/ID."""
    await gateway.limits.admit(who.id)
    job = await gateway.jobs.create("ratings", RatingsParams(), owner=who.id)
    return job.model_dump()
