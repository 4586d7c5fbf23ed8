"""The arena's records: battles (two models, anonymous or named), their turns and votes, and
votes on single-model chats, kept in Redis and exported in FastChat's conversation-log shape.

A battle's live state is a hash (`Keys.battle`) that expires when the battle is left alone;
what happened is appended to durable streams (`Keys.arena_log`) that are never trimmed: they are
the record that ratings are computed from and that `export` writes out.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field

from broker.connection import atomically
from broker.keys import Keys

Side = Literal["left", "right"]
SIDES: tuple[Side, Side] = ("left", "right")
# An hour's vote count is kept into the next hour, then expires.
_VOTE_COUNT_KEEP_S = 2 * 3600
BattleMode = Literal["anonymous", "named"]
BattleVote = Literal["left", "right", "tie", "bothbad"]
ChatVote = Literal["up", "down", "flag"]

# Corral's vote names → FastChat's log `type`.
LOG_TYPES = {
    "left": "leftvote",
    "right": "rightvote",
    "tie": "tievote",
    "bothbad": "bothbad_vote",
    "up": "upvote",
    "down": "downvote",
    "flag": "flag",
}
BATTLE_LOG_TYPES = ("leftvote", "rightvote", "tievote", "bothbad_vote")


class Turn(BaseModel):
    """One prompt and both sides' answers."""

    prompt: str
    left: str
    right: str
    # Why each side stopped (`stop`, `length`, or `error: …` when a side failed).
    finish: tuple[str, str] = ("stop", "stop")
    # The tokens each side's model read for this turn (the conversation so far in its template).
    prompt_tokens: tuple[int, int] = (0, 0)
    gen_params: dict[str, Any] = Field(default_factory=dict[str, Any])
    start: float
    finish_at: float


class BattlePublic(BaseModel):
    """A battle as its player sees it: in an anonymous battle, `models` is null until the vote."""

    id: str
    object: Literal["arena.battle"] = "arena.battle"
    mode: BattleMode
    models: tuple[str, str] | None
    turns: list[Turn]
    vote: BattleVote | None = None
    created_at: float
    # Once the models are shown: what their workers say about them (display name, link, …).
    model_info: list[dict[str, Any]] | None = None


class Battle(BaseModel):
    """A battle's whole state, as kept in its hash."""

    model_config = ConfigDict(frozen=True)

    id: str
    mode: BattleMode
    models: tuple[str, str]  # left, right
    user: str
    created_at: float
    turns: list[Turn] = Field(default_factory=list)
    vote: BattleVote | None = None

    def public(self) -> BattlePublic:
        revealed = self.mode == "named" or self.vote is not None
        return BattlePublic(
            id=self.id,
            mode=self.mode,
            models=self.models if revealed else None,
            turns=self.turns,
            vote=self.vote,
            created_at=self.created_at,
        )

    def messages(self, side: Side) -> list[dict[str, str]]:
        """The conversation one side has seen so far, as chat messages."""
        messages = []
        for turn in self.turns:
            messages.append({"role": "user", "content": turn.prompt})
            messages.append({"role": "assistant", "content": getattr(turn, side)})
        return messages


class AlreadyVoted(Exception):
    pass


class Busy(Exception):
    """A turn of this battle is being generated already."""


class ArenaStore:
    """Battles and votes in Redis."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, battle_ttl_s: int) -> None:
        self.redis = redis
        self.keys = keys
        self.battle_ttl_s = battle_ttl_s

    async def create(self, mode: BattleMode, models: tuple[str, str], user: str) -> Battle:
        battle = Battle(id=uuid.uuid4().hex, mode=mode, models=models, user=user, created_at=time.time())
        key, models_json = self.keys.battle(battle.id), json.dumps(models)
        created = repr(battle.created_at)
        await atomically(
            self.redis,
            ("HSET", key, "mode", mode, "models", models_json, "user", user, "created_at", created),
            ("EXPIRE", key, self.battle_ttl_s),
            (
                "XADD",
                self.keys.arena_log("battles"),
                "*",
                *(
                    "battle_id",
                    battle.id,
                    "mode",
                    mode,
                    "models",
                    models_json,
                    "user",
                    user,
                    "tstamp",
                    created,
                ),
            ),
        )
        return battle

    async def get(self, battle_id: str) -> Battle | None:
        fields = await self.redis.hgetall(self.keys.battle(battle_id))
        if not fields:
            return None
        return Battle(
            id=battle_id,
            mode=fields["mode"],
            models=tuple(json.loads(fields["models"])),
            user=fields["user"],
            created_at=float(fields["created_at"]),
            turns=[Turn.model_validate_json(t) for t in json.loads(fields.get("turns", "[]"))],
            vote=fields.get("vote") or None,
        )

    async def begin_turn(self, battle_id: str, deadline_s: float) -> None:
        """Marks a turn in progress; raises Busy if one is already (a second tab, a double click)."""
        if not await self.redis.set(self.keys.battle_busy(battle_id), "1", nx=True, ex=int(deadline_s) + 1):
            raise Busy()

    async def end_turn(self, battle_id: str) -> None:
        await self.redis.delete(self.keys.battle_busy(battle_id))

    async def turn_running(self, battle_id: str) -> bool:
        return bool(await self.redis.exists(self.keys.battle_busy(battle_id)))

    async def add_turn(self, battle: Battle, turn: Turn) -> Battle:
        played = battle.model_copy(update={"turns": [*battle.turns, turn]})
        chats = [chat_log_record(played, side, turn) for side in ("left", "right")]
        key, encoded = self.keys.battle(battle.id), json.dumps([t.model_dump_json() for t in played.turns])
        await atomically(
            self.redis,
            ("HSET", key, "turns", encoded),
            ("EXPIRE", key, self.battle_ttl_s),
            ("XADD", self.keys.arena_log("turns"), "*", "battle_id", battle.id, "records", json.dumps(chats)),
        )
        return played

    async def vote(self, battle: Battle, vote: BattleVote, user: str) -> Battle:
        """Records the battle's one vote; raises AlreadyVoted for a second one."""
        if not await self.redis.hsetnx(self.keys.battle(battle.id), "vote", vote):
            raise AlreadyVoted()
        voted = battle.model_copy(update={"vote": vote})
        record = battle_log_record(voted, user, time.time())
        await self.redis.xadd(self.keys.arena_log("votes"), {"record": json.dumps(record)})
        return voted

    async def feedback(self, record: dict[str, Any]) -> None:
        """A vote on a single-model chat (up, down, flag), already in the log shape."""
        await self.redis.xadd(self.keys.arena_log("votes"), {"record": json.dumps(record)})

    async def count_vote(self, user: str, per_hour: int) -> int | None:
        """Counts one vote by `user` in the current hour; returns the seconds until the next hour
        when the user is over `per_hour` (0 = no limit), else None."""
        if not per_hour:
            return None
        now = time.time()
        key = self.keys.arena_votes_by(user, int(now // 3600))
        count, _ = await atomically(self.redis, ("INCR", key), ("EXPIRE", key, _VOTE_COUNT_KEEP_S))
        return int(3600 - now % 3600) + 1 if count > per_hour else None

    async def log(self) -> AsyncIterator[dict[str, Any]]:
        """Every vote record (battles and single chats), oldest first."""
        async for fields in self._read("votes"):
            yield json.loads(fields["record"])

    async def turn_log(self) -> AsyncIterator[dict[str, Any]]:
        """Every generated battle turn, as one FastChat `chat` record per side."""
        async for fields in self._read("turns"):
            for record in json.loads(fields["records"]):
                yield record

    async def revealed_turn_log(self) -> AsyncIterator[dict[str, Any]]:
        """The turn log without the turns of anonymous battles that are open and unvoted: a
        battle's turns appear once it has its vote or has expired unvoted."""
        voted = set()
        async for record in self.log():
            if record.get("battle_id"):
                voted.add(record["battle_id"])
        open_now: dict[str, bool] = {}
        async for fields in self._read("turns"):
            battle_id = fields["battle_id"]
            if battle_id not in voted:
                if battle_id not in open_now:
                    mode = await self.redis.hget(self.keys.battle(battle_id), "mode")
                    open_now[battle_id] = mode == "anonymous"
                if open_now[battle_id]:
                    continue
            for record in json.loads(fields["records"]):
                yield record

    async def _read(self, stream_name: str, count: int = 1000) -> AsyncIterator[dict[str, str]]:
        stream = self.keys.arena_log(stream_name)
        start = "-"
        while True:
            entries = await self.redis.xrange(stream, min=start, count=count)
            for _, fields in entries:
                yield fields
            if len(entries) < count:
                return
            start = "(" + entries[-1][0]


# --------------------------------------------------------------------------- FastChat's log shape


def conversation_state(conv_id: str, model: str, messages: list[dict[str, str]]) -> dict[str, Any]:
    """FastChat's conversation state: `messages` as [role, text] pairs after an optional system
    message, `offset` where the conversation proper starts."""
    system = ""
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    return {
        "template_name": "corral",
        "system_message": system,
        "roles": ["user", "assistant"],
        "messages": [[m["role"], m["content"]] for m in messages],
        "offset": 0,
        "conv_id": conv_id,
        "model_name": model,
    }


def battle_log_record(battle: Battle, user: str, tstamp: float) -> dict[str, Any]:
    """A battle vote: `models` hold the public names (empty strings while anonymous, as FastChat
    writes them) and each state carries the model's real name."""
    public = ["", ""] if battle.mode == "anonymous" else list(battle.models)
    assert battle.vote is not None
    return {
        "tstamp": tstamp,
        "type": LOG_TYPES[battle.vote],
        "models": public,
        "states": [
            conversation_state(f"{battle.id}-{side}", model, battle.messages(side))
            for side, model in zip(SIDES, battle.models, strict=True)
        ],
        "ip": user,
        "battle_id": battle.id,
        # Corral's own field (FastChat's tools ignore it): why each side's answers stopped, turn by
        # turn, so the ratings job can leave out battles with an unfinished answer.
        "finish_reasons": [[turn.finish[i] for turn in battle.turns] for i in range(2)],
        # And the tokens each side's model read at each turn (the long-prompt category counts them).
        "prompt_tokens": [[turn.prompt_tokens[i] for turn in battle.turns] for i in range(2)],
    }


def feedback_log_record(
    chat_id: str, model: str, messages: list[dict[str, str]], vote: ChatVote, user: str
) -> dict[str, Any]:
    return {
        "tstamp": time.time(),
        "type": LOG_TYPES[vote],
        "model": model,
        "state": conversation_state(chat_id, model, messages),
        "ip": user,
    }


def chat_log_record(battle: Battle, side: Side, turn: Turn) -> dict[str, Any]:
    """One side's generation in a battle, with its conversation up to and including it."""
    model = battle.models[0 if side == "left" else 1]
    return {
        "tstamp": turn.finish_at,
        "type": "chat",
        "model": model,
        "gen_params": turn.gen_params,
        "start": turn.start,
        "finish": turn.finish_at,
        "state": conversation_state(f"{battle.id}-{side}", model, battle.messages(side)),
        "ip": battle.user,
        "battle_id": battle.id,
    }
