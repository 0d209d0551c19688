"""The nemesis's cluster: a private Redis it may pause and restart, and workers on network hosts
of their own (tests/netns.py) that it may cut off, slow down, pause and kill.

Every process the cluster starts carries the run's marker in its environment, and its pool
process, zygote and job processes inherit it: `procs.marked` finds them all, so that nothing
of a run is left behind unnoticed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from deepe_tasks.fixtures.embedded import RedisServer, WorkerProcess
from tests.nemesis.procs import MARKER, children, cmdline, signal_all, tree
from tests.netns import NetHost


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)


# A slow, lossy link: netem where the kernel has it, else a token bucket so narrow that packets
# queue for up to its latency and are dropped beyond it.
def slow_link_spec(kind: str, loss_pct: int, delay_ms: int) -> list[str]:
    if kind == "netem":
        return ["netem", "loss", f"{loss_pct}%", "delay", f"{delay_ms}ms"]
    return ["tbf", "rate", f"{max(8, 64 - loss_pct)}kbit", "burst", "2kb", "latency", f"{delay_ms}ms"]


@dataclass
class Slot:
    """One network host, and the worker that runs on it now: a killed worker is replaced there."""

    index: int
    host: NetHost
    worker: WorkerProcess | None = None
    generation: int = 0
    names: list[str] = field(default_factory=list)  # every worker this slot had, as Celery names it
    started: dict[str, float] = field(default_factory=dict)  # worker name -> epoch it was started
    ended: dict[str, float] = field(default_factory=dict)  # worker name -> epoch it was killed or stopped
    logs: list[Path] = field(default_factory=list)
    slowed: bool = False


class Cluster:
    """A private Redis with its AOF on (fsync at every write: a restart keeps every job), and
    ``n`` workers of queue ``queue``, each on a host of its own, and each with a queue of its own
    too (`own_queue`): a job there waits for that worker alone, so a hung worker shows."""

    def __init__(self, work: Path, tag: str, n: int, queue: str, env: dict[str, str]) -> None:
        self.work, self.tag, self.queue = work, tag, queue
        self.env = {**env, MARKER: tag, "DEEPE_QUEUE": queue}
        self.slots = [Slot(i, NetHost()) for i in range(n)]
        self.redis: RedisServer | None = None
        self.redis_paused = False
        self.redis_lock = threading.Lock()  # one Redis fault at a time, and none during close
        self.qdisc: str | None = None
        self.qdisc_reason = ""
        self.stop_seconds: dict[str, float] = {}  # worker name -> how long it took to stop on SIGTERM

    # --- start and stop -------------------------------------------------------------------
    def start(self) -> Cluster:
        for slot in self.slots:
            slot.host.create()
        ips = tuple(s.host.host_ip for s in self.slots)
        self.redis = RedisServer(appendonly=True, folder=self.work / "redis", bind=("127.0.0.1", *ips)).start()
        self._durable()
        self.qdisc, self.qdisc_reason = self._probe_qdisc()
        for slot in self.slots:
            self._start_worker(slot)
        for slot in self.slots:
            assert slot.worker is not None
            slot.worker.wait_ready(timeout=120)
        return self

    def _durable(self) -> None:
        """Every write on disk before Redis answers it: a restart, even a SIGKILL, keeps it all.
        Set changes are announced too (keyspace events): the nemesis strikes right after a claim."""
        client = self.client()
        try:
            client.config_set("appendfsync", "always")
            client.config_set("notify-keyspace-events", "Ks")
        finally:
            client.close()

    def _probe_qdisc(self) -> tuple[str | None, str]:
        dev = self.slots[0].host.host_if
        for kind in ("netem", "tbf"):
            spec = slow_link_spec(kind, 30, 200)
            if _run(["tc", "qdisc", "add", "dev", dev, "root", *spec]).returncode == 0:
                _run(["tc", "qdisc", "del", "dev", dev, "root"])
                why = "" if kind == "netem" else "tc netem is missing here (the kernel has no sch_netem); a tbf bucket stands in"
                return kind, why
        return None, "tc can add neither netem nor tbf here: no slow links"

    def _start_worker(self, slot: Slot) -> WorkerProcess:
        assert self.redis is not None
        slot.generation += 1
        name = f"nem{slot.index}g{slot.generation}-{self.tag}@%h"
        log = self.work / "logs" / f"w{slot.index}g{slot.generation}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {**self.env, "DEEPE_REDIS_URL": self.redis.url_at(slot.host.host_ip)}
        slot.worker = WorkerProcess(env, queues=f"{self.queue},{self.own_queue(slot.index)}", name=name, log_file=log,
                                    prefix=slot.host.command([])).start()
        full = self.hostname(name)
        slot.names.append(full)
        slot.started[full] = time.time()
        slot.logs.append(log)
        return slot.worker

    def own_queue(self, index: int) -> str:
        return f"{self.queue}-w{index}"

    def queues_of(self, index: int) -> set[str]:
        return {self.queue, self.own_queue(index)}

    @staticmethod
    def hostname(name: str) -> str:
        return name.replace("%h", socket.gethostname())

    def current(self, slot: Slot) -> str | None:
        return self.hostname(slot.worker.name) if slot.worker is not None else None

    def stop_workers(self, timeout: float = 30.0) -> None:
        """A warm shutdown of every worker at once (SIGTERM), timed; the whole tree is killed after ``timeout``."""
        def stop(slot: Slot) -> None:
            w = slot.worker
            if w is None or w.proc is None:
                return
            pids = tree(w.proc.pid)
            signal_all(pids, signal.SIGCONT)
            began = time.monotonic()
            w.signal(signal.SIGTERM)
            try:
                w.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                signal_all(tree(w.proc.pid), signal.SIGKILL)
                w.proc.wait(timeout=10)
            name = self.hostname(w.name)
            self.stop_seconds[name] = time.monotonic() - began
            slot.ended[name] = time.time()
            slot.worker = None

        threads = [threading.Thread(target=stop, args=(s,), daemon=True) for s in self.slots]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout + 20)

    def close(self) -> None:
        """Undo every fault and stop everything; safe to call at any point, and twice."""
        with self.redis_lock:
            if self.redis is not None and self.redis.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.redis.proc.pid, signal.SIGCONT)
            self.redis_paused = False
        for slot in self.slots:
            self.heal(slot)
            self.unslow(slot)
        self.stop_workers(timeout=20)
        for slot in self.slots:
            slot.host.remove()
        if self.redis is not None:
            self.redis.stop()

    # --- Redis ----------------------------------------------------------------------------
    def client(self, timeout: float = 2.0) -> Any:
        """A client of the private Redis that gives up quickly (the harness's own reads). Its
        replies are decoded: `Any`, as redis-py's types cannot say they are all `str`."""
        assert self.redis is not None
        return redis.Redis(port=self.redis.port, decode_responses=True, socket_timeout=timeout,
                           socket_connect_timeout=timeout)

    def pause_redis(self) -> None:
        assert self.redis is not None and self.redis.proc is not None
        os.kill(self.redis.proc.pid, signal.SIGSTOP)
        self.redis_paused = True

    def resume_redis(self) -> None:
        assert self.redis is not None and self.redis.proc is not None
        os.kill(self.redis.proc.pid, signal.SIGCONT)
        self.redis_paused = False

    def crash_redis(self, sig: signal.Signals) -> None:
        """Stop the server dead (SIGKILL) or cleanly (SIGTERM); `restart_redis` brings it back."""
        assert self.redis is not None and self.redis.proc is not None
        self.redis.proc.send_signal(sig)
        self.redis.proc.wait(timeout=30)
        self.redis.proc = None

    def restart_redis(self) -> None:
        assert self.redis is not None
        self.redis.start(timeout=30)  # the same port and folder: it loads its AOF
        self._durable()

    # --- the network ----------------------------------------------------------------------
    def cut(self, slot: Slot) -> None:
        slot.host.cut()

    def heal(self, slot: Slot) -> None:
        slot.host.heal()

    def slow(self, slot: Slot, spec: list[str]) -> bool:
        """Slow and lossy in both directions; False where tc refused."""
        host = _run(["tc", "qdisc", "add", "dev", slot.host.host_if, "root", *spec])
        inside = _run(slot.host.command(["tc", "qdisc", "add", "dev", slot.host.ns_if, "root", *spec]))
        slot.slowed = True
        return host.returncode == 0 and inside.returncode == 0

    def unslow(self, slot: Slot) -> None:
        if slot.slowed:
            _run(["tc", "qdisc", "del", "dev", slot.host.host_if, "root"])
            _run(slot.host.command(["tc", "qdisc", "del", "dev", slot.host.ns_if, "root"]))
            slot.slowed = False

    # --- processes ------------------------------------------------------------------------
    def worker_tree(self, slot: Slot) -> list[int]:
        w = slot.worker
        if w is None or w.proc is None or w.proc.poll() is not None:
            return []
        return tree(w.proc.pid)

    def pause_worker(self, slot: Slot) -> list[int]:
        """SIGSTOP the worker and every descendant (pool, zygote, job processes: their own sessions)."""
        stopped = self.worker_tree(slot)
        signal_all(stopped[:1], signal.SIGSTOP)  # the root first: it starts nothing new meanwhile
        signal_all(stopped[1:], signal.SIGSTOP)
        late = [p for p in self.worker_tree(slot) if p not in stopped]
        signal_all(late, signal.SIGSTOP)
        return stopped + late

    def resume_worker(self, slot: Slot, pids: list[int]) -> None:
        signal_all(pids + self.worker_tree(slot), signal.SIGCONT)

    def kill_worker(self, slot: Slot) -> list[int]:
        """A lost node: SIGKILL the worker's process group (main and pool); its zygote and job
        processes must die with it by themselves. Returns the whole tree as it was."""
        w = slot.worker
        if w is None or w.proc is None:
            return []
        pids = self.worker_tree(slot)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(w.proc.pid, signal.SIGKILL)
        w.proc.wait(timeout=30)
        slot.ended[self.hostname(w.name)] = time.time()
        slot.worker = None
        return pids

    def replace_worker(self, slot: Slot) -> str:
        """Start a new worker on the slot's host; its name."""
        return self.hostname(self._start_worker(slot).name)

    def zygote_of(self, slot: Slot) -> int | None:
        """The slot's zygote: the process running deepe_tasks.job.zygote whose parent is not one."""
        pids = self.worker_tree(slot)
        zygotes = [p for p in pids if "deepe_tasks.job.zygote" in cmdline(p)]
        kids = children()
        forked = {c for z in zygotes for c in kids.get(z, [])}
        return next((z for z in zygotes if z not in forked), None)
