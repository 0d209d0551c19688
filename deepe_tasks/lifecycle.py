"""A worker's life around its jobs: the reaper of lost jobs, requeues, and shutdown.

Every live worker runs the reaper: a running job whose lease expired lost its worker (SIGKILL,
a node gone), and is put back on its queue to resume from its last checkpoint.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import redis
from celery.signals import worker_ready, worker_shutdown, worker_shutting_down

from . import jobs, keys
from .connection import get_redis
from .records import Event, EventKind, JobRecord, JobStatus
from .settings import get_settings

log = logging.getLogger(__name__)
T = TypeVar("T")


def stop_flag(pid: int) -> Path:
    """A file that says the worker whose main process is ``pid`` is shutting down."""
    return Path(tempfile.gettempdir()) / f"deepe-worker-{pid}.stopping"


def worker_stopping() -> bool:
    """True inside a worker (its main process or a pool child) that is shutting down."""
    return stop_flag(os.getpid()).exists() or stop_flag(os.getppid()).exists()


def retry_redis(fn: Callable[[], T], timeout: float = 300.0) -> T:
    """Call ``fn`` until Redis answers, for writes that must not be lost to a restart."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except redis.RedisError as e:
            if time.monotonic() > deadline:
                raise
            log.warning("Redis is unreachable (%s); retrying", e)
            time.sleep(1.0)


def requeue(client: redis.Redis, record: JobRecord, why: str, unless_exists: str | None = None) -> bool:
    """Put a running job back on its queue, or fail it once it used up its resumes."""
    settings = get_settings()
    resumes = record.attempts  # each attempt after the first is a resume
    if resumes > settings.max_resumes:
        message = (f"The job was interrupted {resumes} times (last: {why}) and DEEPE_MAX_RESUMES is "
                   f"{settings.max_resumes}; its last checkpoint is in the job folder. Find out why its "
                   "workers stop (memory, preemption), then submit it again.")
        if not jobs.transition(client, record.id, {JobStatus.RUNNING}, unless_exists=unless_exists, running=False,
                               status=JobStatus.FAILED, error=message, finished_at=time.time()):
            return False
        client.xadd(keys.events(record.id), {"data": Event(kind=EventKind.FAILED, job=record.id,
                                                           message=message).to_json()})
        return False
    if not jobs.transition(client, record.id, {JobStatus.RUNNING}, unless_exists=unless_exists, running=False,
                           status=JobStatus.QUEUED):
        return False
    from .client import enqueue

    # The event goes first, so that it precedes the next attempt's `started`.
    client.xadd(keys.events(record.id), {"data": Event(
        kind=EventKind.REQUEUED, job=record.id, message=f"requeued: {why}",
        metrics={"attempt": record.attempts}).to_json()})
    try:
        enqueue(record)
    except Exception:
        # Back to running without a lease: the reaper tries again on its next round.
        jobs.transition(client, record.id, {JobStatus.QUEUED}, running=True, status=JobStatus.RUNNING)
        raise
    return True


def reap_once(client: redis.Redis) -> list[str]:
    """Requeue every running job whose lease has expired; return their ids."""
    requeued = []
    for job_id in client.smembers(keys.RUNNING):
        job_id = str(job_id)
        if client.exists(keys.lease(job_id)):
            continue
        try:
            record = jobs.get(client, job_id)
        except Exception:
            client.srem(keys.RUNNING, job_id)
            continue
        if record.status is not JobStatus.RUNNING:
            client.srem(keys.RUNNING, job_id)
            continue
        # The lease check is repeated atomically with the change: a worker that just took
        # the job over keeps it.
        if requeue(client, record, f"its worker {record.worker} was lost", unless_exists=keys.lease(job_id)):
            log.warning("requeued job %s: its worker %s was lost", job_id, record.worker)
            requeued.append(job_id)
    return requeued


def _reaper_loop(stop: threading.Event) -> None:
    interval = max(0.5, get_settings().lease_ttl / 3)
    while not stop.wait(interval):
        try:
            reap_once(get_redis())
        except Exception as e:  # never let the reaper die: it is every worker's safety net
            log.warning("reaper: %s", e)


_reaper_stop = threading.Event()


@worker_ready.connect
def _start_reaper(**_: Any) -> None:
    stop_flag(os.getpid()).unlink(missing_ok=True)
    threading.Thread(target=_reaper_loop, args=(_reaper_stop,), name="deepe-reaper", daemon=True).start()


@worker_shutting_down.connect
def _on_shutdown(**_: Any) -> None:
    # The running job (in a pool child) sees this, checkpoints, and is requeued.
    stop_flag(os.getpid()).touch()
    _reaper_stop.set()


@worker_shutdown.connect
def _on_exit(**_: Any) -> None:
    stop_flag(os.getpid()).unlink(missing_ok=True)
