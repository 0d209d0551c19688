"""The Celery task that runs one job attempt in a fresh, non-daemonic job process.

The worker process itself never imports torch or touches CUDA: it spawns the job process,
keeps the lease alive while it runs, relays cancels, time limits and shutdowns to it, and
records how it ended.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import redis
from celery import states
from celery.exceptions import Ignore

from . import jobs, keys
from .celery_app import app
from .client import Job
from .connection import get_redis
from .errors import JobFailed
from .events import EventPublisher
from .lease import Lease
from .lifecycle import requeue, retry_redis, worker_stopping
from .processes import crash_message, job_process, kill_group
from .protocol import LOG_FILE, PREEMPT_SIGNAL, RESULT_FILE
from .records import Event, EventKind, JobRecord, JobSpec, JobStatus, RunResult
from .settings import get_settings
from .storage import job_dir
from .warm import JobProcess

log = logging.getLogger(__name__)


@app.task(name="deepe.train", bind=True)
def train(self: Any, job_id: str, method: str = "") -> dict[str, Any]:
    """Run one attempt of a job; the job record and its events say how it went."""
    settings = get_settings()
    client = get_redis()
    hostname = self.request.hostname or os.uname().nodename
    lease = Lease(client, job_id, settings.lease_ttl)
    # A zygote's spare costs nothing until it is handed a job, so take it first: then the job
    # starts the moment it is ours. (Without a zygote this starts a process, ended if unused.)
    proc = job_process()
    now = time.time()
    try:
        claim = jobs.claim(client, job_id, lease.key, lease.token, lease.ttl_ms,
                           worker=hostname, started_at=now, pid=proc.pid)
    except BaseException:
        proc.discard()
        raise
    if claim.record is None:
        proc.discard()
        if claim.outcome == "missing":
            log.error("dropping message for job %s: it has no job record", job_id)
        elif claim.outcome == "ended":
            log.info("dropping message for job %s: it is already %s", job_id, claim.detail)
        else:
            log.warning("dropping message for job %s: %s holds its lease", job_id, claim.detail)
        raise Ignore()
    record = claim.record
    started = Event(kind=EventKind.STARTED, job=job_id, message=f"started on {hostname}", metrics={
        "attempt": record.attempts, "pid": proc.pid, "warm": proc.warm, "forked": proc.forked,
        "process_started_at": proc.started_at})

    folder = job_dir(settings.storage_root, job_id)
    folder.mkdir(parents=True, exist_ok=True)
    publisher = EventPublisher(client, job_id, jsonl=folder / "events.jsonl", max_buffer=settings.event_buffer)
    publisher.emit(started)
    try:
        if claim.source is None:
            proc.discard()
            result = _finish(client, record, RunResult(
                status=JobStatus.FAILED, phase="loading the method",
                error=f"The pinned source of {record.method} ({record.method_sha256[:12]}) "
                      "is missing from Redis; submit the job again."), publisher, lease)
        else:
            result = _run_attempt(self, client, record, claim.source, proc, lease, publisher, folder)
    finally:
        publisher.close(timeout=300)
        retry_redis(lease.release)
    if result.status is JobStatus.FAILED:
        raise JobFailed(result.error or "the job failed")
    if result.status is JobStatus.CANCELLED:
        self.update_state(state=states.REVOKED, meta={"job": job_id, "step": result.step})
        raise Ignore()
    if result.status is JobStatus.QUEUED:  # requeued: another message carries the job on
        self.update_state(state="REQUEUED", meta={"job": job_id, "step": result.step})
        raise Ignore()
    return {"job": job_id, "status": result.status.value, "output_dir": result.output_dir,
            "metrics": result.metrics}


def _run_attempt(task: Any, client: redis.Redis, record: JobRecord, source: str, proc: JobProcess, lease: Lease,
                 publisher: EventPublisher, folder: Path) -> RunResult:
    settings = get_settings()
    job_id = record.id
    (folder / RESULT_FILE).unlink(missing_ok=True)
    spec = JobSpec(job_id=job_id, method=record.method, method_sha256=record.method_sha256, source=source,
                   params=record.params, storage_root=str(settings.storage_root),
                   redis_url=settings.redis_url, worker=record.worker or "", started_at=record.started_at or 0.0,
                   time_limit=record.time_limit, checkpoint_minutes=settings.checkpoint_minutes)
    try:
        publisher.flush(timeout=5)  # `started` goes before the job's own events
        announced = proc.pid
        proc.start(spec.model_dump_json())
        if proc.pid != announced:  # the spare died just before the hand-over; another took the job
            jobs.update(client, job_id, pid=proc.pid)
        ended_by = Supervisor(client, record, proc, lease, progress=FlowerProgress(task, job_id)).watch()
    finally:
        # Whatever happened, nothing of this attempt (DataLoader workers, torchrun children)
        # outlives it.
        kill_group(proc)

    result_path = folder / RESULT_FILE
    if result_path.exists():
        result = RunResult.model_validate_json(result_path.read_text())
    elif ended_by == "cancel":
        result = RunResult(status=JobStatus.CANCELLED, phase="training",
                           error=f"cancelled; the job did not stop within DEEPE_CANCEL_GRACE="
                                 f"{settings.cancel_grace:g} s and was killed")
    elif ended_by == "time-limit":
        result = RunResult(status=JobStatus.FAILED, phase="training",
                           error=f"time limit of {record.time_limit:g} s reached; the job did not stop within "
                                 f"DEEPE_CANCEL_GRACE={settings.cancel_grace:g} s and was killed")
    elif ended_by == "preempt":
        result = RunResult(status=JobStatus.QUEUED, phase="training",
                           error="the worker shut down and the job did not checkpoint in time")
    elif ended_by == "lease-lost":
        log.error("job %s: lost its lease to %s; this attempt was stopped", job_id, lease.holder())
        return RunResult(status=JobStatus.QUEUED, phase="training")
    else:
        result = RunResult(status=JobStatus.FAILED, phase="running the job process",
                           error=crash_message(proc.wait(), folder / LOG_FILE))
    return _finish(client, record, result, publisher, lease)


class FlowerProgress:
    """Shows training progress in Flower: a PROGRESS state and `task-progress` events.

    It reads the job's latest event at most once a second, from the worker side, so the
    job process itself does nothing extra.
    """

    INTERVAL = 1.0

    def __init__(self, task: Any, job_id: str) -> None:
        self.task = task
        self.job_id = job_id
        self.last_step: int | None = None
        self.next_report = 0.0

    def report(self, now: float) -> None:
        if now < self.next_report:
            return
        self.next_report = now + self.INTERVAL
        event = Job(self.job_id).progress()
        if event is None or event.step is None or event.step == self.last_step:
            return
        self.last_step = event.step
        meta = {"job": self.job_id, "step": event.step, "max_steps": event.max_steps,
                "loss": event.metrics.get("loss"), "eta_s": event.eta_s}
        self.task.update_state(state="PROGRESS", meta=meta)
        # Flower keeps the standard task fields only; `result` is one, so the figures show in
        # its task list and its API while the job trains.
        self.task.send_event("task-progress", result=json.dumps(meta), **meta)


class Supervisor:
    """Waits for the job process: renews the lease, and stops the job when it must.

    A cancel or time limit is read by the job itself at its next step; if it has not stopped
    after DEEPE_CANCEL_GRACE seconds, its process group is killed. A worker shutdown is relayed
    as a signal, so the job checkpoints and is requeued.
    """

    def __init__(self, client: redis.Redis, record: JobRecord, proc: JobProcess, lease: Lease,
                 progress: FlowerProgress | None = None) -> None:
        self.client = client
        self.record = record
        self.proc = proc
        self.lease = lease
        self.progress = progress
        self.settings = get_settings()

    def watch(self) -> str | None:
        grace = self.settings.cancel_grace
        renew_every = self.settings.lease_ttl / 3
        started = time.monotonic()
        next_renew = started + renew_every
        stop_asked: dict[str, float] = {}
        limit = self.record.time_limit
        while True:
            try:
                self.proc.wait(timeout=0.25)
                return next(iter(stop_asked), None)
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            try:
                if now >= next_renew:
                    if not (self.lease.renew() or self.lease.retake(self.record.attempts)):
                        self._kill()  # another worker took the job over: never two trainers
                        return "lease-lost"
                    next_renew = now + renew_every
                if "cancel" not in stop_asked and self.client.exists(keys.cancel(self.record.id)):
                    stop_asked["cancel"] = now
            except redis.RedisError as e:  # an outage must not end the job
                log.warning("job %s: could not reach Redis: %s", self.record.id, e)
            try:
                if self.progress is not None:
                    self.progress.report(now)
            except Exception as e:  # Flower's view is a nicety: never let it end the job
                log.warning("job %s: could not report progress: %s", self.record.id, e)
            if limit is not None and now - started >= limit:
                stop_asked.setdefault("time-limit", now)
            if "preempt" not in stop_asked and worker_stopping():
                stop_asked["preempt"] = now
                log.warning("job %s: the worker is shutting down; checkpointing to requeue", self.record.id)
                self._signal(PREEMPT_SIGNAL)
            if stop_asked and now - min(stop_asked.values()) > grace:
                log.warning("job %s did not stop within %.0f s; killing it", self.record.id, grace)
                self._kill()
                return min(stop_asked, key=lambda k: stop_asked[k])

    def _signal(self, sig: signal.Signals) -> None:
        try:
            os.kill(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def _kill(self) -> None:
        kill_group(self.proc)


def _finish(client: redis.Redis, record: JobRecord, result: RunResult, publisher: EventPublisher,
            lease: Lease) -> RunResult:
    job_id = record.id
    if not retry_redis(lease.held):
        # Another worker took the job over (after an outage longer than the lease): it owns
        # the job's state now.
        log.error("job %s: this attempt lost its lease; not recording its end", job_id)
        return result.model_copy(update={"status": JobStatus.QUEUED})
    if result.status is JobStatus.QUEUED:
        fresh = retry_redis(lambda: jobs.get(client, job_id))
        publisher.flush(timeout=300)
        # Free the lease first: the requeued message may reach an idle worker at once.
        retry_redis(lease.release)
        retry_redis(lambda: requeue(client, fresh, result.error or "the worker shut down"))
        return result
    kind = {JobStatus.SUCCEEDED: EventKind.SUCCEEDED, JobStatus.CANCELLED: EventKind.CANCELLED}.get(
        result.status, EventKind.FAILED)
    message = result.error or (f"model saved to {result.output_dir}" if result.output_dir else "")
    final = Event(kind=kind, job=job_id, step=result.step, metrics=result.metrics, message=message)
    publisher.flush(timeout=300)  # every earlier event goes first

    def record_end() -> None:
        # One transaction: whoever sees the final event sees the final record, and the reverse.
        pipe = client.pipeline(transaction=True)
        pipe.xadd(keys.events(job_id), {"data": final.to_json()})
        jobs.update(pipe, job_id, status=result.status, error=result.error, finished_at=time.time(),
                    metrics=result.metrics, output_dir=result.output_dir)
        pipe.srem(keys.RUNNING, job_id)
        pipe.execute()

    retry_redis(record_end)
    publisher.write_jsonl([final])
    return result
