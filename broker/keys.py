"""Every Redis key and channel Corral uses, with who owns it and how long it lives.

On Redis Cluster every command and script touches one slot, so keys that are used together share
a hash tag (the part in braces): a model's streams `{model}`; a gateway's event channel and its
requests' progress, attempts and cancel markers `{gateway id}` (so what a worker writes in one
step goes to one node per gateway, and a node that fails holds back only its gateways' answers);
the worker registry `{workers}`, the arena `{arena}`, one caller's rate counters `{caller}`. A
single server ignores the tags, so both run the same commands.
"""

from __future__ import annotations

from dataclasses import dataclass

# Consumer group that all workers of a model join on its request streams.
WORKER_GROUP = "workers"
# Request lanes, most urgent first.
LANES = ("interactive", "batch")


@dataclass(frozen=True)
class Keys:
    prefix: str = "corral"

    def requests(self, model: str, lane: str = "interactive") -> str:
        """Stream of one model's requests in one lane: `interactive` (chat and API traffic) or
        `batch` (judge and bulk traffic, read only when no interactive work waits).

        Written by gateways (XADD), read by workers (XREADGROUP, group `workers`). Entries are
        deleted when acked, so the stream holds only waiting and in-flight work. No TTL."""
        stream = f"{self.prefix}:q:{{{model}}}"
        return stream if lane == "interactive" else f"{stream}:{lane}"

    def output(self, gateway_id: str) -> str:
        """Sharded pub/sub channel (SPUBLISH/SSUBSCRIBE) of the token events of one gateway's
        requests, each message framed with its request id (broker/queue.py). Published by the
        workers that hold them, received by that gateway alone, which subscribes once at start:
        so SPUBLISH's count of receivers says exactly whether the gateway heard, on a cluster
        too, and a channel's messages stay on the shard that owns it."""
        return f"{self.prefix}:out:{{{gateway_id}}}"

    def output_of(self, request_id: str) -> str:
        """The event channel of a request: its gateway's (request ids start with the gateway id)."""
        return self.output(request_id.split(".", 1)[0])

    def cancel(self, model: str) -> str:
        """Sharded pub/sub channel of one model's cancelled request ids. Published by gateways
        (client gone), received by every worker that serves the model."""
        return f"{self.prefix}:cancel:{{{model}}}"

    def cancelled(self, request_id: str) -> str:
        """Marker of a request whose client went away (SET by its gateway with the cancel
        broadcast). A worker looks for it when it claims the request and before it admits it,
        so a request cancelled while it waited in the queue never starts. Expires a minute
        after the request's deadline."""
        return self._of_request("cancelled", request_id)

    def progress(self, request_id: str) -> str:
        """String log of one in-flight request's progress (broker/progress.py's format): what
        each choice generated and how far its events went. The worker holding the request
        APPENDs to it with each publish; a worker that reclaims the request reads it. Deleted
        on ack; expires a minute after the request's deadline in any case."""
        return self._of_request("progress", request_id)

    def attempts(self, request_id: str) -> str:
        """Counter of how many workers have taken one request over (INCR by the reclaiming
        worker). Deleted on ack; expires with the request's progress."""
        return self._of_request("progress", request_id) + ":attempts"

    def _of_request(self, kind: str, request_id: str) -> str:
        """A key of one request, in its gateway's slot (the id's first part, as in output_of)."""
        gateway = request_id.split(".", 1)[0]
        return f"{self.prefix}:{kind}:{{{gateway}}}{request_id[len(gateway) :]}"

    def jobs_queue(self, gpu: bool = False) -> str:
        """arq's queue (a sorted set arq owns) of long-lived jobs: CPU work, or `:gpu` for
        training. Written by gateways and the CLI (enqueue), read by job runners."""
        return f"{self.prefix}:jobs:gpu" if gpu else f"{self.prefix}:jobs"

    def job(self, job_id: str) -> str:
        """Hash of one job: kind, params, status, stage, done/total, message, timestamps, result,
        error, `abort` once asked to stop. Written by whoever creates the job and by the runner
        that runs it; read by the API and the CLI. Expires `job_keep_s` after the job ends."""
        return f"{self.prefix}:job:{job_id}"

    def job_events(self, job_id: str) -> str:
        """Stream of one job's progress updates (the hash's fields as they change), for live
        views. Capped at about 1,000 entries; expires with the job's hash."""
        return f"{self.prefix}:job:{job_id}:events"

    @property
    def jobs_index(self) -> str:
        """Sorted set of job ids by creation time (ms), for listing. Entries of expired jobs
        are removed when a listing finds them gone."""
        return f"{self.prefix}:jobs:index"

    def battle(self, battle_id: str) -> str:
        """Hash of one arena battle's live state: mode, models (left, right), user, turns, and
        `vote` once cast (HSETNX: one vote per battle). Written by gateways; expires
        `arena_battle_ttl_s` after the battle was last played."""
        return f"{self.prefix}:{{arena}}:battle:{battle_id}"

    def battle_busy(self, battle_id: str) -> str:
        """Marks a battle turn in progress (SET NX), so a battle plays one turn at a time. Deleted
        when the turn ends; expires with the turn's deadline in any case."""
        return f"{self.prefix}:{{arena}}:battle:{battle_id}:busy"

    def arena_log(self, name: str) -> str:
        """Durable streams of what happened in the arena, never trimmed: `battles` (created),
        `turns` (each turn's two generations, as FastChat `chat` records) and `votes` (battle
        and single-chat votes, as FastChat log records). Written by gateways; read by the
        ratings job and the export."""
        return f"{self.prefix}:{{arena}}:{name}"

    def arena_votes_by(self, user: str, hour: int) -> str:
        """Counter of one user's votes in one clock hour, for the vote limit. Written by
        gateways; expires two hours after it was first counted."""
        return f"{self.prefix}:{{arena}}:votes-by:{user}:{hour}"

    @property
    def leaderboard(self) -> str:
        """String (JSON) of the latest leaderboard. Written by the ratings job, read by the
        gateway's /v1/leaderboard. No TTL: the latest one stays until the next."""
        return f"{self.prefix}:{{arena}}:leaderboard"

    @property
    def judge_results(self) -> str:
        """Hash of judge runs' results: field = run name (question set/mode/judge), value = JSON
        summary with the questions, answers and judgments to browse. Written by judgment jobs,
        read by the gateway's /v1/judge/results. No TTL: a run stays until it is run again."""
        return f"{self.prefix}:judge:results"

    def rate(self, caller: str, what: str, window: int) -> str:
        """Counter of `what` (requests or tokens) one caller used in one window (a minute unless
        CORRAL_RATE_LIMIT_WINDOW_S says otherwise). Written by gateways (INCR/INCRBY); expires
        two windows after its window opened. `caller` is a hash of the API key, never the key."""
        return f"{self.prefix}:rate:{{{caller}}}:{what}:{window}"

    def worker(self, worker_id: str) -> str:
        """Hash describing one live worker. Written by the worker's heartbeat task with a TTL of
        `worker_ttl_s`; it expires on its own when the worker dies."""
        return f"{self.prefix}:{{workers}}:worker:{worker_id}"

    @property
    def workers(self) -> str:
        """Sorted set of worker ids, scored by when each one's hash expires (ms): the registry's
        index, so finding the live workers never scans the keyspace. Written with each heartbeat
        (in one script with the hash); entries past their score are removed as they are found."""
        return f"{self.prefix}:{{workers}}:index"
