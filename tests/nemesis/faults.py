"""The nemesis: a seeded plan of faults, injected at random moments and for random lengths.

The plan (kinds, targets, moments, lengths, triggers) is drawn from the seed alone, so a seed
names a run; how the faults then interleave with the jobs depends on timing, which is what
the search is for. A fault either starts at its moment, or (trigger "claim") at the first job
its worker claims after that moment: the instant right after a claim, when a worker hands the
job to its job process, is where blips used to hang workers. At most one fault holds a
target at a time (Redis, a worker's link, a worker's processes); faults on different targets
overlap freely. Every fault is undone in a ``finally``, and at once when the nemesis stops.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from tests.nemesis.cluster import Cluster, Slot, slow_link_spec
from tests.nemesis.procs import alive, cmdline, marked, signal_all

log = logging.getLogger(__name__)

# How often each kind is drawn, relative to the others.
WEIGHTS = {
    "link_cut": 3.0, "slow_link": 2.0, "redis_pause": 1.5, "redis_restart": 1.5,
    "job_kill": 2.0, "zygote_kill": 0.7, "worker_kill": 1.3, "worker_pause": 2.0,
}
KINDS = tuple(WEIGHTS)
CLAIM_TRIGGERED = {"link_cut", "slow_link", "redis_pause", "job_kill", "worker_pause"}


@dataclass
class Fault:
    """One fault, as planned and as it happened (epoch seconds; ``injected`` False: it had no target)."""

    n: int
    kind: str
    slot: int  # the worker's host it strikes (unused for Redis faults)
    at: float  # seconds after the start of the run
    duration: float
    trigger: str = "time"
    options: dict[str, Any] = field(default_factory=dict)
    started: float | None = None
    ended: float | None = None
    injected: bool = False
    target: str = ""
    detail: str = ""
    survivors: list[str] = field(default_factory=list)  # processes that outlived a killed worker

    @property
    def resource(self) -> str:
        if self.kind.startswith("redis"):
            return "redis"
        return f"{'net' if self.kind in ('link_cut', 'slow_link') else 'proc'}{self.slot}"

    def row(self) -> dict[str, Any]:
        return asdict(self)


def plan(rng: random.Random, n: int, window: float, slots: int, ttl: float, kinds: tuple[str, ...],
         claim_share: float = 0.35) -> list[Fault]:
    """``n`` faults spread over ``window`` seconds: their kinds, targets, moments and lengths;
    ``claim_share`` of those that can wait for a claim do."""
    weights = [WEIGHTS[k] for k in kinds]
    # Every kind once (in a random order) when there are enough faults, then as weighted.
    first = rng.sample(kinds, len(kinds)) if n >= len(kinds) else []
    faults, at = [], rng.uniform(2.0, 8.0)
    for i in range(n):
        kind = first[i] if i < len(first) else rng.choices(kinds, weights)[0]
        # Lengths around the lease: shorter ones must be ridden out, longer ones cost the attempt.
        duration = {
            "link_cut": rng.choice([rng.uniform(0.3, 2.0), rng.uniform(0.8, 1.2) * ttl, rng.uniform(1.2, 3.0) * ttl]),
            "slow_link": rng.uniform(2.0, 3.0 * ttl),
            "redis_pause": rng.choice([rng.uniform(0.3, 2.5), rng.uniform(0.6, 1.6) * ttl]),
            "redis_restart": rng.uniform(0.2, 1.5 * ttl),
            "job_kill": 0.0, "zygote_kill": 0.0,
            "worker_kill": rng.uniform(0.0, 5.0),  # until the replacement starts
            "worker_pause": rng.choice([rng.uniform(0.3, 2.0), rng.uniform(0.6, 3.0) * ttl]),
        }[kind]
        trigger = "claim" if kind in CLAIM_TRIGGERED and rng.random() < claim_share else "time"
        options: dict[str, Any] = {}
        if kind == "slow_link":
            options = {"loss_pct": rng.randint(10, 50), "delay_ms": rng.randint(50, 500)}
        elif kind == "redis_restart":
            options = {"signal": rng.choice(["SIGKILL", "SIGTERM"])}
        faults.append(Fault(i, kind, rng.randrange(slots), round(at, 2), round(duration, 2), trigger, options))
        at += rng.expovariate(n / window)
    return faults


class Nemesis:
    """Runs a fault plan against a cluster from threads of its own; `stop` ends every fault now."""

    def __init__(self, cluster: Cluster, faults: list[Fault], t0: float) -> None:
        self.cluster, self.faults, self.t0 = cluster, faults, t0
        self._stop = threading.Event()
        self._busy: set[str] = set()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._driver = threading.Thread(target=self._drive, name="nemesis", daemon=True)

    def start(self) -> Nemesis:
        self._driver.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> bool:
        """Wait until every fault ran and was undone; False if that took longer than ``timeout``."""
        deadline = time.monotonic() + timeout
        self._driver.join(max(0.0, deadline - time.monotonic()))
        for t in list(self._threads):
            t.join(max(0.0, deadline - time.monotonic()))
        return not self._driver.is_alive() and not any(t.is_alive() for t in self._threads)

    def _drive(self) -> None:
        for fault in self.faults:
            if self._stop.wait(max(0.0, self.t0 + fault.at - time.time())):
                return
            while not self._take(fault.resource):
                if self._stop.wait(0.2):
                    return
            t = threading.Thread(target=self._one, args=(fault,), name=f"fault-{fault.n}", daemon=True)
            self._threads.append(t)
            t.start()

    def _take(self, resource: str) -> bool:
        with self._lock:
            if resource in self._busy:
                return False
            self._busy.add(resource)
            return True

    def _one(self, fault: Fault) -> None:
        slot = self.cluster.slots[fault.slot]
        try:
            if fault.trigger == "claim":
                fault.detail = self._await_claim(slot)
            getattr(self, f"_{fault.kind}")(fault, slot)
        except Exception as e:  # a fault that could not be made is reported, never fatal
            log.exception("fault %d (%s) failed", fault.n, fault.kind)
            fault.detail += f" harness error: {e!r}"
        finally:
            fault.ended = fault.ended or time.time()
            with self._lock:
                self._busy.discard(fault.resource)

    def _await_claim(self, slot: Slot, timeout: float = 10.0) -> str:
        """Return as soon as the slot's worker claims a job (or after ``timeout``): the claim adds
        the job to the running set, which Redis announces (keyspace events, `Cluster._durable`)."""
        name, since = self.cluster.current(slot), time.time()
        client = self.cluster.client(timeout=1.0)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        deadline = time.monotonic() + timeout
        try:
            try:
                pubsub.subscribe("__keyspace@0__:deepe:running")
            except Exception:  # Redis away: polling alone finds the claim
                pass
            while time.monotonic() < deadline and not self._stop.is_set():
                try:
                    pubsub.get_message(timeout=0.5)  # a claim, or half a second: look either way
                except Exception:  # Redis away, or restarted: poll meanwhile
                    self._stop.wait(0.2)
                try:
                    running = sorted(client.smembers("deepe:running"))
                    pipe = client.pipeline(transaction=False)
                    for job in running:
                        pipe.hmget(f"deepe:job:{job}", ["worker", "started_at"])
                    for job, (worker, started) in zip(running, pipe.execute(), strict=True):
                        if worker == name and started and float(started) >= since:
                            return f"{(time.time() - float(started)) * 1000:.0f} ms after {name} claimed {job};"
                except Exception:  # Redis away: look again in a while
                    self._stop.wait(0.5)
        finally:
            pubsub.close()
            client.close()
        return f"no claim within {timeout:.0f} s;"

    def _hold(self, fault: Fault) -> None:
        """The fault is in place: note when, and keep it for its length (or until stopped)."""
        fault.started, fault.injected = time.time(), True
        self._stop.wait(fault.duration)

    # --- the kinds ------------------------------------------------------------------------
    def _link_cut(self, fault: Fault, slot: Slot) -> None:
        fault.target = slot.host.name
        self.cluster.cut(slot)
        try:
            self._hold(fault)
        finally:
            self.cluster.heal(slot)

    def _slow_link(self, fault: Fault, slot: Slot) -> None:
        kind = self.cluster.qdisc
        if kind is None:
            fault.detail += f" skipped: {self.cluster.qdisc_reason}"
            return
        spec = slow_link_spec(kind, fault.options["loss_pct"], fault.options["delay_ms"])
        fault.target = slot.host.name
        fault.detail += " " + " ".join(spec)
        try:
            if not self.cluster.slow(slot, spec):
                fault.detail += " (tc refused)"
                return
            self._hold(fault)
        finally:
            self.cluster.unslow(slot)

    def _redis_pause(self, fault: Fault, slot: Slot) -> None:
        fault.target = "redis"
        with self.cluster.redis_lock:
            self.cluster.pause_redis()
            try:
                self._hold(fault)
            finally:
                self.cluster.resume_redis()

    def _redis_restart(self, fault: Fault, slot: Slot) -> None:
        fault.target, sig = "redis", signal.Signals[fault.options["signal"]]
        fault.detail += f" stopped by {sig.name}"
        with self.cluster.redis_lock:
            self.cluster.crash_redis(sig)
            try:
                self._hold(fault)
            finally:
                self.cluster.restart_redis()

    def _job_kill(self, fault: Fault, slot: Slot) -> None:
        """SIGKILL the job process (rank 0) of a running job: the slot's, or else any worker's."""
        tag = self.cluster.tag
        client = self.cluster.client()
        try:
            running = sorted(client.smembers("deepe:running"))
            records = {j: client.hmget(f"deepe:job:{j}", ["worker", "pid"]) for j in running}
        except Exception as e:
            fault.detail += f" skipped: Redis did not answer ({e})"
            return
        finally:
            client.close()
        name = self.cluster.current(slot)
        ours = [j for j in running if records[j][0] == name] or running
        for job in ours:
            pid = int(records[job][1] or 0)
            if pid and alive(pid) and pid in marked(tag):
                fault.target = f"job {job} pid {pid} on {records[job][0]}"
                signal_all([pid], signal.SIGKILL)
                fault.started = fault.ended = time.time()
                fault.injected = True
                return
        fault.detail += " skipped: no running job process"

    def _zygote_kill(self, fault: Fault, slot: Slot) -> None:
        pid = self.cluster.zygote_of(slot)
        if pid is None:
            fault.detail += " skipped: the worker has no zygote now"
            return
        fault.target = f"zygote pid {pid} of {self.cluster.current(slot)}"
        signal_all([pid], signal.SIGKILL)
        fault.started = fault.ended = time.time()
        fault.injected = True

    def _worker_kill(self, fault: Fault, slot: Slot) -> None:
        fault.target = str(self.cluster.current(slot))
        pids = self.cluster.kill_worker(slot)
        if not pids:
            fault.detail += " skipped: the worker was gone"
            self.cluster.replace_worker(slot)
            return
        fault.started, fault.injected = time.time(), True
        try:
            # Its zygote and job processes die with it (PR_SET_PDEATHSIG), at once.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and any(alive(p) for p in pids):
                time.sleep(0.2)
            fault.survivors = [f"{p} {cmdline(p)[:120]}" for p in pids if alive(p)]
            signal_all([p for p in pids if alive(p)], signal.SIGKILL)
            self._stop.wait(fault.duration)
        finally:
            fault.detail += f" replaced by {self.cluster.replace_worker(slot)}"

    def _worker_pause(self, fault: Fault, slot: Slot) -> None:
        fault.target = f"{self.cluster.current(slot)} and its whole tree"
        pids = self.cluster.pause_worker(slot)
        try:
            if pids:
                fault.detail += f" {len(pids)} processes"
                self._hold(fault)
            else:
                fault.detail += " skipped: the worker was gone"
        finally:
            self.cluster.resume_worker(slot, pids)
