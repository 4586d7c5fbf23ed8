"""Corral's transport on a Redis Cluster (3 masters, 3 replicas), on a single server and on a
single server with a replica, in one sitting, with the model-free engine (TokenTap in
tests/helpers.py) so Redis and Corral's own code are all that is measured:

- short requests/s (non-streamed, 1 token) and streamed tokens/s (1 token per event), with 1, 2
  and 4 gateways and 2 workers, the load from wrk split over the gateways;
- Redis CPU per 1,000 streamed tokens, per node (user + system time of each server process),
  summed over all nodes and over the masters alone;
- cluster-bus messages per 1,000 streamed tokens (CLUSTER INFO's counters);
- the failover pause: while 8 answers stream through a gateway, the master that holds its event
  channel is killed; the pause is the longest time any answer then goes without a token. Each
  answer's text is checked whole (nothing lost, nothing twice). p50 and max over the runs.

    python bench/cluster.py
    python bench/cluster.py --duration 8 --failovers 5 --json bench/results/cluster.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.transport import wrk
from broker.settings import Settings
from tests.cluster import LocalCluster, free_port_run, valkey_binary
from tests.conftest import free_port
from tests.helpers import TokenTap

MODEL = "tap"


def run_worker(step_s: float) -> None:
    """A worker process: Corral's runtime around TokenTap, one token per step."""
    from transformers import AutoTokenizer

    from broker.connection import connect
    from broker.keys import Keys
    from broker.registry import WorkerRegistry
    from workers.loading import resolve_model_path
    from workers.runtime import Worker
    from workers.sequence import TokenFrontend

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings()

    async def serve() -> None:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(settings.model, settings.home))
        url = settings.redis_url or ""
        engine = TokenTap(tokenizer, settings.max_batch, 1, step_s=step_s)
        worker = Worker(
            engine,
            TokenFrontend(tokenizer),
            connect(url),
            Keys(settings.key_prefix),
            MODEL,
            "none",
            worker_ttl_s=15,
            unheard_grace_s=60,
        )
        worker.beats = WorkerRegistry(connect(url), worker.keys)
        await worker.run()

    asyncio.run(serve())


class Single:
    """One valkey-server (the same binary as the cluster's), in a temporary folder; with
    `replica`, a second one replicating it, as a single server with failover (Sentinel, or a
    managed primary with a replica) runs, so its CPU compares like for like with a cluster whose
    masters have a replica each."""

    def __init__(self, folder: Path, replica: bool = False) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.masters = [self.port]
        self.processes = {self.port: self._start(folder, self.port)}
        self.url = f"redis://127.0.0.1:{self.port}"
        if replica:
            port = free_port()
            self.processes[port] = self._start(folder, port, "--replicaof", "127.0.0.1", str(self.port))
            self._wait(lambda r: r.info("replication")["master_link_status"] == "up", port)

    @staticmethod
    def _start(folder: Path, port: int, *extra: str) -> subprocess.Popen:
        args = [valkey_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder)]
        args += ["--dbfilename", f"{port}.rdb", "--save", "", "--appendonly", "no", *extra]
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        Single._wait(lambda r: r.ping(), port)
        return process

    @staticmethod
    def _wait(ready, port: int) -> None:
        import redis

        deadline = time.monotonic() + 30
        while True:
            try:
                if ready(redis.Redis(port=port, decode_responses=True)):
                    return
            except redis.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"valkey on port {port} is not ready")
            time.sleep(0.05)

    def stop(self) -> None:
        for process in self.processes.values():
            process.kill()
            process.wait(10)


def cpu_s(pid: int) -> float:
    """User + system seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def command_calls(servers) -> dict[str, int]:
    """Calls per command so far, summed over the live nodes (INFO commandstats)."""
    import redis

    calls: dict[str, int] = {}
    for port, process in servers.processes.items():
        if process.poll() is None:
            for name, stats in redis.Redis(port=port).info("commandstats").items():
                command = name.removeprefix("cmdstat_")
                calls[command] = calls.get(command, 0) + int(stats["calls"])
    return calls


def per_unit(before: dict[str, int], after: dict[str, int], units: float) -> dict[str, float]:
    """Each command's calls per unit (request or token) between two snapshots."""
    return {
        command: round((after[command] - before.get(command, 0)) / units, 3)
        for command in sorted(after)
        if after[command] - before.get(command, 0) > 0
    }


def master_ports(servers) -> set[int]:
    """The ports of the servers that are masters now (a cluster's roles change with failovers)."""
    if not isinstance(servers, LocalCluster):
        return set(servers.masters)
    import redis

    return {
        port
        for port in servers.live_ports()
        if redis.Redis(port=port, decode_responses=True).info("replication")["role"] == "master"
    }


def bus_messages(servers) -> int:
    import redis

    total = 0
    for port, process in servers.processes.items():
        if process.poll() is None and isinstance(servers, LocalCluster):
            info = redis.Redis(port=port).execute_command("CLUSTER INFO")
            total += int(info.get("cluster_stats_messages_sent", 0))
    return total


class Stack:
    def __init__(self, url: str, gateways: int, workers: int, connections: int, step_s: float = 0.0) -> None:
        self.env = dict(
            os.environ,
            CORRAL_REDIS_URL=url,
            CORRAL_JOBS_REDIS_URL=os.environ.get("CORRAL_JOBS_REDIS_URL", "redis://127.0.0.1:6379/0"),
            CORRAL_KEY_PREFIX=f"bench-{uuid.uuid4().hex[:8]}",
            CORRAL_MAX_BATCH=str(connections * 2),
            CORRAL_MAX_BACKLOG="0",
            CORRAL_WORKER_TTL_S="15",
            CORRAL_UNHEARD_GRACE_S="60",
        )
        self.processes: list[subprocess.Popen] = []
        self.urls = []
        for _ in range(gateways):
            port = free_port()
            env = dict(self.env, CORRAL_PORT=str(port))
            self.processes.append(subprocess.Popen([sys.executable, "-m", "gateway"], env=env))
            self.urls.append(f"http://127.0.0.1:{port}")
        for _ in range(workers):
            worker = [sys.executable, __file__, "--worker", "--step-s", str(step_s)]
            self.processes.append(subprocess.Popen(worker, env=self.env))
        for url in self.urls:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"{url}/v1/models", timeout=1).json()["data"]:
                        break
                except (httpx.HTTPError, KeyError, ValueError):
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{url} serves no model")
                time.sleep(0.3)

    def gateway_ids(self) -> list[str]:
        return [httpx.get(f"{url}/readyz", timeout=5).json()["gateway"] for url in self.urls]

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()


def load(urls: list[str], body: dict, connections: int, duration_s: int) -> float:
    """wrk against every gateway at once (the connections split between them); total requests/s."""
    from concurrent.futures import ThreadPoolExecutor

    share = max(connections // len(urls), 1)
    with ThreadPoolExecutor(len(urls)) as pool:
        results = list(pool.map(lambda url: wrk(url, body, share, duration_s), urls))
    if any(r["non_2xx"] for r in results):
        raise RuntimeError(f"non-2xx answers: {results}")
    return sum(r["requests_per_s"] for r in results)


def throughput(servers, label: str, args) -> list[dict]:
    rows = []
    short = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    streamed = {**short, "max_tokens": args.stream_tokens, "stream": True}
    for gateways in (1, 2, 4):
        stack = Stack(servers.url, gateways, 2, args.connections)
        try:
            load(stack.urls, short, args.connections, 2)  # warm-up
            calls_before = command_calls(servers)
            requests_per_s = load(stack.urls, short, args.connections, args.duration)
            short_calls = per_unit(calls_before, command_calls(servers), requests_per_s * args.duration)
            load(stack.urls, streamed, args.connections, 2)
            calls_before = command_calls(servers)
            cpu_before = {port: cpu_s(p.pid) for port, p in servers.processes.items()}
            bus_before = bus_messages(servers)
            started = time.monotonic()
            streams_per_s = load(stack.urls, streamed, args.connections, args.duration)
            elapsed = time.monotonic() - started
            tokens = streams_per_s * args.duration * args.stream_tokens
            cpu = {port: cpu_s(p.pid) - cpu_before[port] for port, p in servers.processes.items()}
            masters = master_ports(servers)
            bus = bus_messages(servers) - bus_before
            stream_calls = per_unit(calls_before, command_calls(servers), tokens)
        finally:
            stack.stop()
        row = {
            "redis": label,
            "gateways": gateways,
            "short_requests_per_s": round(requests_per_s, 1),
            "streamed_tokens_per_s": round(streams_per_s * args.stream_tokens, 1),
            "redis_cpu_ms_per_1000_tokens": {
                str(port): round(1e6 * s / max(tokens, 1), 2) for port, s in cpu.items() if s > 0
            },
            "redis_cpu_ms_per_1000_tokens_total": round(1e6 * sum(cpu.values()) / max(tokens, 1), 2),
            "redis_cpu_ms_per_1000_tokens_masters": round(
                1e6 * sum(s for port, s in cpu.items() if port in masters) / max(tokens, 1), 2
            ),
            "bus_messages_per_1000_tokens": round(1000 * bus / max(tokens, 1), 2),
            "seconds": round(elapsed, 1),
            # Includes the heartbeats and idle reads of the run's length, not only the traffic.
            "commands_per_short_request": short_calls,
            "commands_per_streamed_token": stream_calls,
        }
        rows.append(row)
        print(
            f"{label:8} {gateways} gateway(s): {row['short_requests_per_s']:8.1f} short req/s  "
            f"{row['streamed_tokens_per_s']:10,.0f} streamed tok/s  Redis CPU "
            f"{row['redis_cpu_ms_per_1000_tokens_total']:.2f} ms/1k tokens "
            f"({row['redis_cpu_ms_per_1000_tokens_masters']:.2f} on masters)  "
            f"bus {row['bus_messages_per_1000_tokens']:.2f} msg/1k tokens",
            flush=True,
        )
    return rows


async def one_failover(cluster: LocalCluster, stack: Stack, tokenizer) -> tuple[float, bool]:
    """8 answers stream through the first gateway; the master of its channel is killed. Returns
    the longest time any answer then went without a token, and whether every text was whole."""
    tokens = 1000  # 10 s at the failover stack's pace: longer than a failover
    expected = tokenizer.decode(TokenTap(tokenizer, 1).text(tokens))
    channel = f"{stack.env['CORRAL_KEY_PREFIX']}:out:{{{stack.gateway_ids()[0]}}}"
    victim = cluster.master_of(channel)
    arrivals: list[list[float]] = [[] for _ in range(8)]
    texts = [""] * 8
    loop = asyncio.get_running_loop()

    async def stream(client: httpx.AsyncClient, i: int) -> None:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": tokens,
            "stream": True,
        }
        async with client.stream("POST", f"{stack.urls[0]}/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    texts[i] += chunk["choices"][0]["delta"].get("content") or ""
                    arrivals[i].append(loop.time())

    async with httpx.AsyncClient(timeout=120) as client:
        tasks = [asyncio.create_task(stream(client, i)) for i in range(8)]
        while not all(len(a) >= 5 for a in arrivals):
            await asyncio.sleep(0.01)
        killed = loop.time()
        cluster.kill(victim)
        await asyncio.gather(*tasks)
    pause = max(
        next((t for t in a if t > killed), a[-1]) - max((t for t in a if t <= killed), default=killed)
        for a in arrivals
    )
    cluster.restart(victim)
    await asyncio.to_thread(cluster.wait_ok, 60)
    return pause, all(text == expected for text in texts)


def failovers(cluster: LocalCluster, runs: int) -> dict:
    from transformers import AutoTokenizer

    from workers.loading import resolve_model_path

    settings = Settings()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(settings.model, settings.home))
    pauses, whole = [], []
    stack = Stack(cluster.url, 1, 2, 16, step_s=0.01)
    try:
        for run in range(runs):
            pause, ok = asyncio.run(one_failover(cluster, stack, tokenizer))
            pauses.append(pause)
            whole.append(ok)
            print(f"failover {run + 1}: streams paused {pause:.2f} s, every text whole: {ok}", flush=True)
    finally:
        stack.stop()
    return {
        "runs": runs,
        "node_timeout_ms": cluster.node_timeout_ms,
        "pause_p50_s": round(statistics.median(pauses), 2),
        "pause_max_s": round(max(pauses), 2),
        "pauses_s": [round(p, 2) for p in pauses],
        "all_whole": all(whole),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk run")
    parser.add_argument("--stream-tokens", type=int, default=128)
    parser.add_argument("--failovers", type=int, default=5)
    parser.add_argument("--failovers-only", action="store_true", help="skip the throughput runs")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--step-s", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return run_worker(args.step_s)
    if not shutil.which("wrk"):
        sys.exit("needs wrk: apt-get install wrk")
    results: dict = {"throughput": []}
    with tempfile.TemporaryDirectory() as folder:
        for label, replica in () if args.failovers_only else (("single", False), ("single+replica", True)):
            single = Single(Path(folder) / label, replica=replica)
            try:
                results["throughput"] += throughput(single, label, args)
            finally:
                single.stop()
        cluster = LocalCluster(Path(folder) / "cluster", free_port_run(6)).start()
        try:
            if not args.failovers_only:
                results["throughput"] += throughput(cluster, "cluster", args)
            if args.failovers:
                results["failover"] = failovers(cluster, args.failovers)
        finally:
            cluster.stop()
    by = {(r["redis"], r["gateways"]): r for r in results["throughput"]}
    for gateways in (1, 2, 4) if by else ():
        c, s, sr = (by[(label, gateways)] for label in ("cluster", "single", "single+replica"))

        def ratio(a: dict, b: dict, key: str) -> float:
            return a[key] / max(b[key], 1e-9)

        print(
            f"{gateways} gateway(s): cluster/single streamed tokens "
            f"{ratio(c, s, 'streamed_tokens_per_s'):.2f}x, short requests "
            f"{ratio(c, s, 'short_requests_per_s'):.2f}x; Redis CPU per token: masters/single "
            f"{ratio(c, s, 'redis_cpu_ms_per_1000_tokens_masters'):.2f}x, all nodes/single+replica "
            f"{ratio(c, sr, 'redis_cpu_ms_per_1000_tokens_total'):.2f}x, all nodes/single "
            f"{ratio(c, s, 'redis_cpu_ms_per_1000_tokens_total'):.2f}x"
        )
    failover = results.get("failover")
    if failover:
        print(
            f"failover pause: p50 {failover['pause_p50_s']} s, max {failover['pause_max_s']} s "
            f"(node timeout {failover['node_timeout_ms']} ms); every text whole: {failover['all_whole']}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
