"""What a run leaves to judge it by: samples taken while it ran, and each job's history after.

The sampler reads, once a second, which jobs wait in the queue, which job each worker runs,
and every job's state (a job that ever leaves a final state shows here). After the run,
`collect` gathers each job's record, its Redis stream (with each entry's attempt `a` and
number `s`), its `events.jsonl`, and every model folder under the run's output folder.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepe_tasks.core import keys
from tests.nemesis.cluster import Cluster


@dataclass
class Sample:
    t: float  # epoch seconds
    waiting: dict[str, str]  # queued job -> its queue, for jobs whose message was sent (not in the unsent set)
    busy: dict[str, str]  # worker -> a job it runs (the records of the running jobs)
    status: dict[str, str]  # job -> state


class Sampler:
    """Samples the cluster from a thread of its own; a sample that Redis did not answer is skipped."""

    def __init__(self, cluster: Cluster, jobs: Callable[[], list[str]], interval: float = 1.0) -> None:
        self.cluster, self.jobs, self.interval = cluster, jobs, interval
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        client = self.cluster.client(timeout=1.0)
        try:
            while not self._stop.wait(self.interval):
                try:
                    self.samples.append(self.sample(client))
                except Exception:  # Redis paused, restarting: no sample this time
                    continue
        finally:
            client.close()

    def sample(self, client: Any) -> Sample:
        t = time.time()
        unsent = set(client.zrange(keys.UNSENT, 0, -1))
        queued = sorted(set(client.zrange(keys.by_status("queued"), 0, -1)) - unsent)
        running = sorted(client.smembers(keys.RUNNING))
        pipe = client.pipeline(transaction=False)
        for job in running:
            pipe.hmget(keys.job(job), ["worker", "status"])
        for job in queued:
            pipe.hget(keys.job(job), "queue")
        replies = pipe.execute()
        waiting = {job: str(q) for job, q in zip(queued, replies[len(running):], strict=True) if q}
        busy = {}
        for job, (worker, status) in zip(running, replies[:len(running)], strict=True):
            if worker and status == "running":
                busy[worker] = job
        ids = self.jobs()
        pipe = client.pipeline(transaction=False)
        for job in ids:
            pipe.hget(keys.job(job), "status")
        status = {job: s for job, s in zip(ids, pipe.execute(), strict=True) if s}
        return Sample(t, waiting, busy, status)


@dataclass
class JobHistory:
    id: str
    record: dict[str, Any] | None  # the hash as stored, params and metrics parsed
    stream: list[dict[str, Any]]  # {"id", "a", "s", "event"} in stream order
    jsonl: list[dict[str, Any]]  # events.jsonl, in file order
    jsonl_raw: list[str] = field(default_factory=list)


def collect(cluster: Cluster, storage: Path, jobs: list[str]) -> dict[str, JobHistory]:
    client = cluster.client(timeout=10.0)
    try:
        out = {}
        for job in jobs:
            raw = client.hgetall(keys.job(job))
            record: dict[str, Any] | None = None
            if raw:
                record = dict(raw)
                for key in ("params", "metrics"):
                    if key in record:
                        record[key] = json.loads(record[key])
            stream = [{"id": entry_id, "a": int(f.get("a") or 0), "s": int(f.get("s") or 0),
                       "event": _parse(f.get("data", ""))} for entry_id, f in client.xrange(keys.events(job))]
            path = storage / "jobs" / job / "events.jsonl"
            lines = path.read_text(errors="replace").splitlines() if path.exists() else []
            out[job] = JobHistory(job, record, stream, [_parse(line) for line in lines], lines)
        return out
    finally:
        client.close()


def _parse(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
        return value if isinstance(value, dict) else {"unparsed": text}
    except ValueError:
        return {"unparsed": text}


def models(root: Path) -> dict[str, Any]:
    """Every folder under the run's output folder: published models (with their deepe.json), and
    hidden ones (a staging folder, an old model moved aside) left behind."""
    found: dict[str, Any] = {"models": [], "hidden": []}
    if not root.exists():
        return found
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            found["hidden"].append(entry.name)
            continue
        manifest = entry / "deepe.json"
        data = _parse(manifest.read_text(errors="replace")) if manifest.is_file() else None
        found["models"].append({"path": str(entry), "manifest": data})
    return found


def log_lines(cluster: Cluster, needle: str, limit: int = 12) -> list[str]:
    """The last lines of the workers' logs that mention ``needle``, each with its log's name."""
    hits: list[str] = []
    for slot in cluster.slots:
        for log in slot.logs:
            try:
                text = log.read_text(errors="replace")
            except OSError:
                continue
            hits += [f"{log.name}: {line.strip()[:400]}" for line in text.splitlines() if needle in line]
    return hits[-limit:]
