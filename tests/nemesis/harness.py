"""The nemesis harness: one seeded run of real jobs under random faults, then the invariants.

    report = run(Config(seed=7), work, storage, model, data, method="nemesis")
    print(report.table())
    assert not report.violations

A run starts a cluster (`cluster.py`: a private Redis with its AOF fsynced at every write, and
workers on network hosts of their own), submits a workload (`workload.py`) while the nemesis
(`faults.py`) strikes, samples the cluster as it goes (`history.py`), waits for every job to
end, stops the cluster, and checks the invariants (`invariants.py`). Everything it started is
stopped and undone in a ``finally``, whatever happened.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deepe_tasks.core.settings import get_settings
from tests import netns
from tests.nemesis import invariants
from tests.nemesis.cluster import Cluster
from tests.nemesis.faults import KINDS, Fault, Nemesis, plan
from tests.nemesis.history import JobHistory, Sampler, collect, log_lines, models
from tests.nemesis.procs import cmdline, marked, signal_all
from tests.nemesis.workload import JobPlan, Workload


class Unavailable(Exception):
    """Raised when this machine cannot host the cluster (no root, no network namespaces)."""


@dataclass
class Config:
    seed: int = 23
    workers: int = 2
    jobs: int = 18
    merges: int = 2
    faults: int = 16
    window_s: float = 90.0  # faults and submits are spread over this long
    lease_ttl: float = 5.0
    cancel_grace: float = 5.0
    checkpoint_minutes: float = 0.02  # a checkpoint about every second: resumes have one to start from
    max_resumes: int = 8  # a job may lose many attempts to the nemesis before it fails
    idle_bound_s: float = 30.0  # invariant 2: the longest a worker may idle while jobs wait
    settle_s: float = 20.0  # a worker is excused this long after a fault near it (a lease and a reaper round)
    drain_bound_s: float = 150.0  # invariant 1: every job ends this long after the last fault
    kinds: tuple[str, ...] = KINDS
    claim_share: float = 0.35  # of the faults that can wait for a worker's next claim, how many do


@dataclass
class Report:
    config: Config
    tag: str
    work: str
    duration_s: float
    faults: list[Fault]
    jobs: list[JobPlan]
    outcomes: dict[str, int]
    violations: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)

    def faults_by_kind(self) -> dict[str, dict[str, int]]:
        table = {k: {"injected": 0, "skipped": 0} for k in self.config.kinds}
        for f in self.faults:
            table[f.kind]["injected" if f.injected else "skipped"] += 1
        return table

    def violations_by_invariant(self) -> dict[str, int]:
        counts = Counter(v["invariant"] for v in self.violations)
        return {name: counts.get(name, 0) for name in invariants.INVARIANTS}

    def summary(self) -> dict[str, Any]:
        return {
            "seed": self.config.seed, "tag": self.tag, "work": self.work, "duration_s": round(self.duration_s, 1),
            "faults_injected": sum(f.injected for f in self.faults), "faults_by_kind": self.faults_by_kind(),
            "jobs": sum(j.submitted for j in self.jobs), "outcomes": self.outcomes,
            "violations_by_invariant": self.violations_by_invariant(), "violations": self.violations,
            "notes": self.notes,
        }

    def table(self) -> str:
        lines = [f"nemesis seed {self.config.seed} ({self.tag}): {sum(f.injected for f in self.faults)} faults "
                 f"injected, {sum(j.submitted for j in self.jobs)} jobs {self.outcomes}, "
                 f"{len(self.violations)} violations, {self.duration_s:.0f} s; files in {self.work}",
                 f"{'fault kind':<15}{'injected':>9}{'skipped':>9}"]
        lines += [f"{k:<15}{v['injected']:>9}{v['skipped']:>9}" for k, v in self.faults_by_kind().items()]
        lines.append(f"{'invariant':<15}{'violations':>10}")
        lines += [f"{k:<15}{v:>10}" for k, v in self.violations_by_invariant().items()]
        lines.append(f"{'t (s)':>7} {'len':>5}  {'kind':<14}{'trigger':<8} target / detail")
        t0 = min((f.started for f in self.faults if f.started), default=0.0)
        for f in sorted(self.faults, key=lambda f: f.started or float("inf")):
            at = f"{f.started - t0:7.1f}" if f.started else "      -"
            lines.append(f"{at} {f.duration:5.1f}  {f.kind:<14}{f.trigger:<8} {f.target} {f.detail}".rstrip())
        for v in self.violations:
            lines.append(f"VIOLATION {v['invariant']} {v['subject']}: {v['detail']}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _env(config: Config) -> dict[str, str]:
    return {"DEEPE_LEASE_TTL": f"{config.lease_ttl:g}", "DEEPE_CANCEL_GRACE": f"{config.cancel_grace:g}",
            "DEEPE_CHECKPOINT_MINUTES": f"{config.checkpoint_minutes:g}", "DEEPE_MAX_RESUMES": str(config.max_resumes),
            "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def params(model: Path, data: Path) -> dict[str, Any]:
    """A short real SFT run on the tiny model (the method is tests/conftest.py's SLOW_METHOD)."""
    return {"MODEL_PATH": str(model), "DATASET_PATH": str(data), "BATCH_SIZE": 4, "MAX_SEQ_LENGTH": 64,
            "LORA_RANK": 4, "LEARNING_RATE": 5e-3, "PromptInputColumn": "instruction", "PromptOutputColumn": "output"}


def run(config: Config, work: Path, storage: Path, model: Path, data: Path, method: str) -> Report:
    """One run. ``method`` must be in DEEPE_METHOD_STORE already; DEEPE_STORAGE is ``storage``."""
    reason = netns.available()
    if reason:
        raise Unavailable(reason)
    began = time.monotonic()
    rng = random.Random(config.seed)
    tag = f"s{config.seed}p{os.getpid() % 100000}"
    faults = plan(rng, config.faults, config.window_s, config.workers, config.lease_ttl, config.kinds,
                  config.claim_share)
    cluster = Cluster(work, tag, config.workers, f"nem-{tag}", _env(config))
    own = [cluster.own_queue(i) for i in range(config.workers)]
    workload = Workload.draw(rng, tag, method, [cluster.queue, *own], params(model, data), config.jobs,
                             config.merges, config.window_s)
    saved_url = os.environ.get("DEEPE_REDIS_URL")
    nemesis: Nemesis | None = None
    sampler: Sampler | None = None
    try:
        cluster.start()
        assert cluster.redis is not None
        os.environ["DEEPE_REDIS_URL"] = cluster.redis.url
        get_settings.cache_clear()
        t0 = time.time()
        sampler = Sampler(cluster, lambda: [j.id for j in workload.jobs if j.submitted]).start()
        workload.start(t0)
        nemesis = Nemesis(cluster, faults, t0).start()
        longest = max((f.duration for f in faults), default=0.0)
        if not nemesis.join(config.window_s * 2 + longest + 60):
            nemesis.stop()  # the faults that waited too long for their target end here
            nemesis.join(60)
        workload.done.wait(config.window_s + 120)
        faults_end = max((f.ended for f in faults if f.ended), default=time.time())
        _drain(cluster, workload.jobs, faults_end + config.drain_bound_s)
        # Each worker must still take a job of its own queue: a hung one does not.
        workload.probe(own)
        _drain(cluster, workload.jobs, time.time() + config.idle_bound_s + config.settle_s + 30)
        checked_at = time.time()
        sampler.stop()
        histories = collect(cluster, storage, [j.id for j in workload.jobs if j.submitted])
        found = models(storage / "nemesis" / tag)
        cluster.stop_workers()
        after_stop = _left_behind(tag, wait=10.0)
    finally:
        workload.stop.set()
        if nemesis is not None:
            nemesis.stop()
            nemesis.join(60)
        if sampler is not None:
            sampler.stop()
        cluster.close()
        _left_behind(tag, wait=5.0)
        if saved_url is None:
            os.environ.pop("DEEPE_REDIS_URL", None)
        else:
            os.environ["DEEPE_REDIS_URL"] = saved_url
        get_settings.cache_clear()
    workers = {name: (s.index, s.started[name], s.ended.get(name, checked_at)) for s in cluster.slots for name in s.names}
    violations = (
        invariants.terminal(histories, workload.jobs, sampler.samples, faults_end, config.drain_bound_s, checked_at)
        + invariants.idle_workers(sampler.samples, workers, faults, config.idle_bound_s, config.settle_s,
                                  cluster.stop_seconds, {i: cluster.queues_of(i) for i in range(config.workers)})
        + invariants.models(histories, workload.jobs, found)
        + invariants.events(histories)
        + invariants.leftovers(after_stop, faults, found["hidden"])
    )
    for v in violations:  # what the workers said about it, for the post-mortem
        v["log"] = log_lines(cluster, v["subject"].split("@")[0])
    _dump(work / "history.json", histories, workload.jobs, faults, violations)
    outcomes = Counter(str((h.record or {}).get("status")) for h in histories.values())
    notes = [*workload.errors, *(f"left in the output folder: {h}" for h in found["hidden"])]
    if cluster.qdisc_reason:
        notes.append(cluster.qdisc_reason)
    notes += [f"{j.id}: not submitted ({j.submit_error})" for j in workload.jobs if not j.submitted]
    return Report(config, tag, str(work), time.monotonic() - began, faults, workload.jobs, dict(outcomes),
                  violations, notes)


def _dump(path: Path, histories: dict[str, JobHistory], jobs: list[JobPlan], faults: list[Fault],
          violations: list[dict[str, Any]]) -> None:
    """Everything the checks read, for a post-mortem once the cluster is gone."""
    data = {"jobs": [j.row() for j in jobs], "faults": [f.row() for f in faults], "violations": violations,
            "histories": {k: asdict(h) for k, h in histories.items()}}
    path.write_text(json.dumps(data, indent=1, default=str))


def _drain(cluster: Cluster, jobs: list[JobPlan], deadline: float) -> None:
    """Wait until every submitted job has ended, or ``deadline`` (epoch seconds) passed."""
    client = cluster.client()
    try:
        while time.time() < deadline:
            ids = [j.id for j in jobs if j.submitted]
            try:
                states = [client.hget(f"deepe:job:{j}", "status") for j in ids]
            except Exception:
                states = ["?"]
            if all(s in invariants.FINAL for s in states):
                return
            time.sleep(1.0)
    finally:
        client.close()


def _left_behind(tag: str, wait: float) -> list[str]:
    """The run's processes still alive ``wait`` seconds from now; they are killed then."""
    deadline = time.monotonic() + wait
    while marked(tag) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = marked(tag)
    described = [f"{pid} {cmdline(pid)[:160]}" for pid in left]
    signal_all(left, signal.SIGKILL)
    return described
