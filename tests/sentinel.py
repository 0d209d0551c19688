"""A real Redis Sentinel topology for tests and benchmarks: one primary, N replicas and three
sentinels on loopback, each a redis-server process of its own, with its config and log in a
folder of its own under `workdir`.

    with Topology(tmp_path, replicas=1) as topo:
        old = topo.primary_port()
        topo.kill(old)
        new = topo.wait_for_new_primary(old)

Every wait is bounded and fails with a `TopologyTimeout` that carries the tails of the
processes' logs.
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from deepe_tasks.fixtures.embedded import free_port, redis_server_binary

T = TypeVar("T")

SENTINELS = 3
QUORUM = 2
ASK_TIMEOUT = 0.5  # seconds per question to one process: a stopped one must not stall a wait
LOG_TAIL = 25  # lines of each log in a timeout's message
# down-after-milliseconds. Not 1 s: that is the sentinels' ping period, and with it a sentinel
# now and then found a primary it had just switched to down (no PONG within 1 s of the new
# link) and failed over once more, with every server healthy (seen here and in CI).
DOWN_AFTER_MS = 2000
# How long to stop a primary so that the sentinels surely fail over: down-after, one ping
# period, and the election.
FORCED_FAILOVER_PAUSE_S = DOWN_AFTER_MS / 1000 + 2


class TopologyTimeout(TimeoutError):
    """A wait of the topology ran out; the message ends with the processes' logs."""


def _q(value: str | Path) -> str:
    """A value quoted for a redis.conf line (paths and passwords may hold spaces or quotes)."""
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class _Node:
    """One redis-server process: a data server or a sentinel."""

    port: int
    folder: Path
    sentinel: bool
    proc: subprocess.Popen[bytes] | None = None
    paused: bool = False

    @property
    def conf(self) -> Path:
        return self.folder / ("sentinel.conf" if self.sentinel else "redis.conf")

    @property
    def log(self) -> Path:
        return self.folder / ("sentinel.log" if self.sentinel else "redis.log")

    @property
    def stdout(self) -> Path:
        # What the server prints before its logfile is open (a bad config line, a taken port).
        return self.folder / "stdout.log"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def answering(self) -> bool:
        """Running and not stopped: worth asking."""
        return self.running() and not self.paused

    def tail(self) -> str:
        parts = []
        for path in (self.stdout, self.log):
            if path.exists() and path.stat().st_size:
                lines = path.read_text(errors="replace").splitlines()[-LOG_TAIL:]
                parts.append(f"--- {path} (last {len(lines)} lines)\n" + "\n".join(lines))
        return "\n".join(parts) or f"--- {self.folder}: no log"


class Topology:
    """One primary, N replicas and 3 sentinels on loopback, each a redis-server process of its own."""

    def __init__(self, workdir: Path, replicas: int = 1, master_name: str = "deepe", down_after_ms: int = DOWN_AFTER_MS,
                 failover_timeout_ms: int = 5000, password: str | None = None) -> None:
        if replicas < 0:
            raise ValueError("replicas must be 0 or more")
        self.workdir = Path(workdir)
        self.replicas = replicas
        self.master_name = master_name
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.password = password
        ports = self._distinct_ports(replicas + 1 + SENTINELS)
        self._data = [_Node(p, self.workdir / str(p), sentinel=False) for p in ports[:replicas + 1]]
        self.sentinel_ports: list[int] = ports[replicas + 1:]
        self._sentinels = [_Node(p, self.workdir / f"sentinel-{p}", sentinel=True) for p in self.sentinel_ports]
        self._why = ""  # what the last wait's check saw, for its timeout message

    @staticmethod
    def _distinct_ports(n: int) -> list[int]:
        ports: list[int] = []
        while len(ports) < n:
            port = free_port()
            if port not in ports:
                ports.append(port)
        return ports

    # --- addresses -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The sentinels as kombu and Celery take them (the password, URL-quoted, is the data servers')."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return ";".join(f"sentinel://{auth}127.0.0.1:{p}" for p in self.sentinel_ports) + "/0"

    def server_ports(self) -> list[int]:
        """Every data server's port, primary and replicas (the first started as the primary)."""
        return [n.port for n in self._data]

    def client(self, port: int) -> redis.Redis:
        """A client of one data server that answers in strings and never retries (a dead
        server fails at once); close it after use."""
        return redis.Redis(port=port, password=self.password, decode_responses=True,
                           socket_timeout=ASK_TIMEOUT * 4, socket_connect_timeout=ASK_TIMEOUT,
                           retry=Retry(NoBackoff(), 0))

    def _sentinel_client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, decode_responses=True, socket_timeout=ASK_TIMEOUT,
                           socket_connect_timeout=ASK_TIMEOUT, retry=Retry(NoBackoff(), 0))

    def _ask(self, port: int, question: Callable[[redis.Redis], T], sentinel: bool = False) -> T | None:
        """One question to one process; None when it does not answer."""
        client = self._sentinel_client(port) if sentinel else self.client(port)
        try:
            return question(client)
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            return None
        finally:
            client.close()

    def _named_primaries(self) -> dict[int, int]:
        """The primary's port that each answering sentinel names, by the sentinel's port."""
        named = {}
        for node in self._sentinels:
            if node.answering():
                # (ip, port), or None when it watches no such name; redis-py's stubs say otherwise.
                addr: Any = self._ask(
                    node.port, lambda c: c.sentinel_get_master_addr_by_name(self.master_name), sentinel=True)
                if addr:
                    named[node.port] = int(addr[1])
        return named

    def primary_port(self) -> int:
        """The port the sentinels currently name as primary (the first sentinel that answers)."""
        for port in self._named_primaries().values():
            return port
        raise TopologyTimeout(f"no sentinel names a primary for {self.master_name!r}\n{self.logs()}")

    def role(self, port: int) -> str | None:
        """What that server's ROLE says it is ('master', 'slave'), None if it does not answer."""
        reply = self._ask(port, lambda c: c.execute_command("ROLE"))
        return str(reply[0]) if reply else None

    def replicas_acking(self, port: int) -> int:
        """INFO replication's connected_slaves of that server (0 if it does not answer)."""
        info = self._ask(port, lambda c: c.info("replication"))
        return int(info.get("connected_slaves", 0)) if info else 0

    # --- waiting ---------------------------------------------------------------------------

    def switches(self) -> list[str]:
        """The switches of primary the sentinels logged ("A -> B"), each once: 1 for one failover."""
        seen: list[str] = []
        for node in self._sentinels:
            text = node.log.read_text(errors="replace") if node.log.exists() else ""
            for m in re.finditer(r"\+switch-master \S+ \S+ (\d+) \S+ (\d+)", text):
                if f"{m[1]} -> {m[2]}" not in seen:
                    seen.append(f"{m[1]} -> {m[2]}")
        return seen

    def logs(self) -> str:
        """The tails of every process's logs, for a failure's message."""
        return "\n".join(n.tail() for n in [*self._data, *self._sentinels])

    def _wait(self, what: str, check: Callable[[], T | None], timeout: float, interval: float = 0.05) -> T:
        deadline = time.monotonic() + timeout
        self._why = ""
        while True:
            done = check()
            if done:
                return done
            if time.monotonic() > deadline:
                why = f" (last seen: {self._why})" if self._why else ""
                raise TopologyTimeout(f"{what}: not within {timeout} s{why}\n{self.logs()}")
            time.sleep(interval)

    def _pinging(self, node: _Node) -> bool:
        if not node.running():
            raise TopologyTimeout(f"redis-server on port {node.port} exited with code "
                                  f"{node.proc.returncode if node.proc else None}\n{node.tail()}")
        client = self._sentinel_client(node.port) if node.sentinel else self.client(node.port)
        try:
            return bool(client.ping())
        except (redis.ConnectionError, redis.TimeoutError):
            return False
        except redis.ResponseError as e:  # LOADING: up, not ready
            return not str(e).startswith("LOADING")
        finally:
            client.close()

    def _linked(self, primary: int, replica: int) -> bool:
        """That replica follows that primary and its link is up."""
        info = self._ask(replica, lambda c: c.info("replication"))
        if not info:
            return False
        return info.get("role") == "slave" and int(info.get("master_port", 0)) == primary \
            and info.get("master_link_status") == "up"

    def _settled(self) -> bool:
        """Every answering sentinel names the same running primary, knows the 2 other sentinels,
        and sees every other answering data server as its healthy replica."""
        named = self._named_primaries()
        self._why = f"the sentinels name these primaries: {named}"
        if not named or len(set(named.values())) != 1:
            return False
        primary = next(iter(named.values()))
        if self.role(primary) != "master":
            self._why = f"the named primary {primary} answers ROLE {self.role(primary)!r}"
            return False
        expected = {n.port for n in self._data if n.answering() and n.port != primary}
        for port in named:
            state: Any = self._ask(port, lambda c: (c.sentinel_master(self.master_name),
                                               c.sentinel_slaves(self.master_name)), sentinel=True)
            if state is None:
                return False
            master, slaves = state
            if master["flags"] != "master" or int(master["num-other-sentinels"]) != SENTINELS - 1:
                self._why = (f"sentinel {port} flags the primary {master['flags']!r} and knows "
                             f"{master['num-other-sentinels']} other sentinels")
                return False
            # Flags are comma-separated ("slave,s_down,disconnected"): a plain "slave" is up. Its link
            # is read from the replica itself: a sentinel refreshes its copy every 10 s only.
            healthy = {int(s["port"]) for s in slaves if s["flags"] == "slave"}
            if not expected <= healthy:
                self._why = f"sentinel {port} sees healthy replicas {sorted(healthy)}, not {sorted(expected)}"
                return False
        unlinked = [p for p in expected if not self._linked(primary, p)]
        self._why = f"replicas {unlinked} are not linked to {primary}"
        return not unlinked

    def wait_settled(self, timeout: float = 60.0) -> int:
        """Until the sentinels agree on a primary and see every running data server as its replica
        (after `start`, a failover or a `restart`; a paused server is not waited for); returns the
        primary's port."""
        self._wait("the sentinels to agree on a primary and see every running server as its replica",
                   self._settled, timeout, interval=0.2)
        return self.primary_port()

    def wait_for_new_primary(self, old_port: int, timeout: float = 30) -> int:
        """Until every answering sentinel names the same primary other than `old_port`, and that
        server answers ROLE as master; returns its port."""
        def promoted() -> int | None:
            named = set(self._named_primaries().values())
            self._why = f"the sentinels name {sorted(named)}"
            if len(named) != 1:
                return None
            port = named.pop()
            return port if port != old_port and self.role(port) == "master" else None
        return self._wait(f"a primary other than {old_port}", promoted, timeout)

    def wait_seen_up(self, port: int, timeout: float = 30) -> None:
        """Until every sentinel lists that data server as a replica it can reach (its flags are
        a plain "slave"), whatever the server's own ROLE says."""
        def seen() -> bool:
            for node in self._sentinels:
                slaves: Any = self._ask(node.port, lambda c: c.sentinel_slaves(self.master_name), sentinel=True)
                flags = {int(s["port"]): s["flags"] for s in slaves or []}
                self._why = f"sentinel {node.port} flags it {flags.get(port)!r}"
                if flags.get(port) != "slave":
                    return False
            return True
        self._wait(f"every sentinel to see {port} up", seen, timeout, interval=0.1)

    # --- processes -------------------------------------------------------------------------

    def _node(self, port: int) -> _Node:
        for node in [*self._data, *self._sentinels]:
            if node.port == port:
                return node
        raise KeyError(f"port {port} is none of this topology's processes")

    def _write_conf(self, node: _Node, replica_of: int | None) -> None:
        node.folder.mkdir(parents=True, exist_ok=True)
        common = [f"port {node.port}", "bind 127.0.0.1", "daemonize no", f"dir {_q(node.folder)}",
                  f"logfile {_q(node.log)}"]
        if node.sentinel:
            name = self.master_name
            lines = [*common, f"sentinel monitor {name} 127.0.0.1 {self._data[0].port} {QUORUM}",
                     f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
                     f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
                     f"sentinel parallel-syncs {name} 1"]
            if self.password:
                lines.append(f"sentinel auth-pass {name} {_q(self.password)}")
        else:
            # repl-timeout is low so that a stopped replica (or primary) is noticed in seconds;
            # the ping period must stay under it or an idle link would time out.
            # A full sync starts at once, not after the default 5 s wait for more replicas.
            lines = [*common, 'save ""', "appendonly no", "repl-timeout 5", "repl-ping-replica-period 1",
                     "repl-diskless-sync-delay 0"]
            if self.password:
                lines += [f"requirepass {_q(self.password)}", f"masterauth {_q(self.password)}"]
            if replica_of is not None:
                lines.append(f"replicaof 127.0.0.1 {replica_of}")
        node.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, node: _Node, timeout: float) -> None:
        args = [redis_server_binary(), str(node.conf)] + (["--sentinel"] if node.sentinel else [])
        with node.stdout.open("ab") as out:
            node.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        node.paused = False
        self._wait(f"redis-server on port {node.port} to answer PING", lambda: self._pinging(node), timeout)

    def start(self, timeout: float = 60.0) -> Topology:
        """Start the primary, the replicas, then the sentinels; wait until every sentinel sees the
        primary, its replicas and the other sentinels. On failure, stops what it started."""
        if any(n.proc is not None for n in [*self._data, *self._sentinels]):
            raise RuntimeError("this topology is started already")
        atexit.register(self.stop)  # no redis-server outlives an interpreter that forgot stop()
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            primary, *replicas = self._data
            self._write_conf(primary, None)
            self._spawn(primary, timeout)
            for node in replicas:
                self._write_conf(node, primary.port)
                self._spawn(node, timeout)
            # The replicas are linked before the sentinels start, so that each sentinel's first
            # INFO of the primary lists them (else they are found at its next INFO, 10 s later).
            self._wait("the replicas to link to the primary",
                       lambda: all(self._linked(primary.port, n.port) for n in replicas), timeout)
            for node in self._sentinels:
                self._write_conf(node, None)
                self._spawn(node, timeout)
            self.wait_settled(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """SIGKILL every process this topology started (SIGCONT first the stopped ones). Safe to
        call twice and after a failed start; leaves the folders for a post-mortem."""
        for node in [*self._sentinels, *self._data]:
            proc = node.proc
            if proc is None:
                continue
            if proc.poll() is None:
                if node.paused:
                    os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
            proc.wait()
            node.proc, node.paused = None, False
        atexit.unregister(self.stop)

    def kill(self, port: int) -> None:
        """SIGKILL that server (a data server or a sentinel) and reap it: its port is free again."""
        node = self._node(port)
        if node.proc is not None and node.proc.poll() is None:
            node.proc.kill()
            node.proc.wait()
        node.paused = False

    def restart(self, port: int, timeout: float = 30.0, as_replica: bool = True) -> None:
        """Start a killed server again on its port. A data server comes back, empty (they keep
        nothing on disk), as a replica of the primary the sentinels name, as the start script of
        a Sentinel deployment without persistence does (the Bitnami chart's, for one). With
        ``as_replica=False`` it starts from its own config file, so that a former primary comes
        back as an empty primary, for about 10 s until the sentinels turn it into a replica: a
        failover in that window promotes it and loses every write (`docs/operations.md`;
        `tests/test_sentinel_topology.py` shows both)."""
        node = self._node(port)
        if node.running():
            raise RuntimeError(f"redis-server on port {port} is still running: kill it first")
        if as_replica and not node.sentinel:
            primary = self.primary_port()
            if primary == port:
                raise RuntimeError(f"the sentinels still name {port} the primary: wait_for_new_primary first")
            self._write_conf(node, primary)
        self._spawn(node, timeout)

    def pause(self, port: int) -> None:
        """SIGSTOP that server: it holds its connections and answers nothing."""
        node = self._node(port)
        if not node.running() or node.proc is None:
            raise RuntimeError(f"redis-server on port {port} is not running")
        node.proc.send_signal(signal.SIGSTOP)
        node.paused = True

    def resume(self, port: int) -> None:
        """SIGCONT that server."""
        node = self._node(port)
        if node.running() and node.proc is not None:
            node.proc.send_signal(signal.SIGCONT)
        node.paused = False

    def pid(self, port: int) -> int | None:
        """The process id of the server on that port (None when it is not running)."""
        node = self._node(port)
        return node.proc.pid if node.proc is not None and node.running() else None

    def __enter__(self) -> Topology:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
