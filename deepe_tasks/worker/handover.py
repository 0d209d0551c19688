"""Handing a claimed job to its job process: every step bounded, every failure an end.

Between the claim and the moment the job process has its spec, the worker makes the attempt's
Redis user, serialises the spec and sends it over the zygote's pipe. Any of these can fail: a
Redis blip, a value that cannot be sent, a zygote that died or does not answer. Each failure
becomes the attempt's end (``NotHandedOver.result``): the job goes back to its queue when the
fault was the worker's or Redis's, and fails with the reason when it is the job's own. None of
them may leave the worker waiting on a process that will never report.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis

from deepe_tasks.core import jobstore
from deepe_tasks.core.records import JobSpec, JobStatus, Phase, RunResult
from deepe_tasks.worker import watchdog
from deepe_tasks.worker.processes import JobProcess
from deepe_tasks.worker.supervisor import Attempt
from deepe_tasks.worker.zygote_client import HandoverFailed

log = logging.getLogger(__name__)
T = TypeVar("T")


class NotHandedOver(Exception):
    """Raised when a claimed job could not be handed to its job process; ``result`` is how the
    attempt ends, and ``preempted`` whether that costs the job none of its resumes."""

    def __init__(self, result: RunResult, preempted: bool) -> None:
        super().__init__(result.error)
        self.result = result
        self.preempted = preempted


def retry_redis(fn: Callable[[], T], timeout: float) -> T:
    """Call ``fn`` until Redis answers or ``timeout`` passes (then its error is raised)."""
    deadline = time.monotonic() + timeout
    while True:
        watchdog.beat()
        try:
            return fn()
        except redis.RedisError as e:
            if time.monotonic() > deadline:
                raise
            log.warning("Redis is unreachable (%s); retrying", e)
            time.sleep(min(1.0, max(0.1, deadline - time.monotonic())))


def hand_over(attempt: Attempt, source: str, proc: JobProcess) -> None:
    """Give the job process its spec; raise NotHandedOver when that cannot be done.

    Redis gets half a lease TTL to answer: the lease, fresh from the claim, outlives that by
    far, and the Supervisor renews it at once afterwards.
    """
    settings, record = attempt.settings, attempt.record
    try:
        credential = retry_redis(attempt.credential.create, timeout=settings.lease_ttl / 2)
    except redis.RedisError as e:
        raise NotHandedOver(RunResult(
            status=JobStatus.QUEUED, phase=Phase.PREPARING,
            error=f"its worker could not reach Redis to start it ({e})"), preempted=True) from e
    try:
        spec = JobSpec(job_id=record.id, method=record.method, method_sha256=record.method_sha256, source=source,
                       params=record.params, storage_root=str(settings.storage_root), attempt=attempt.number,
                       claim=attempt.holder, submitted_at=record.submitted_at,
                       min_replicas=settings.min_replicas, replication_timeout=settings.redis_replication_timeout,
                       lease_ttl=settings.lease_ttl, redis_url=credential.url, redis_username=credential.username,
                       redis_password=credential.password, worker=record.worker or "",
                       started_at=record.started_at or 0.0, time_limit=record.time_limit,
                       checkpoint_minutes=settings.checkpoint_minutes, event_buffer=settings.event_buffer,
                       world_size=record.gpus, kind=record.kind,
                       input_roots=[str(p) for p in settings.input_root_list], storage_url=settings.storage_url,
                       cache_dir=str(settings.cache_dir.expanduser()), cache_gb=settings.cache_gb).model_dump_json()
    except ValueError as e:  # pydantic's serialisation errors are ValueErrors: the job's own values
        raise NotHandedOver(RunResult(
            status=JobStatus.FAILED, phase=Phase.PREPARING,
            error=f"The job's parameters cannot be sent to its job process ({e}). Submit it again with "
                  "parameters that are plain UTF-8 text and numbers."), preempted=False) from e
    announced = proc.pid
    watchdog.beat()
    try:
        proc.start(spec)
    except HandoverFailed as e:
        # Counted as a loss: a worker whose zygote keeps failing must not hold a job for ever.
        raise NotHandedOver(RunResult(
            status=JobStatus.QUEUED, phase=Phase.PREPARING,
            error=f"its worker could not start a job process: {e}"), preempted=False) from e
    watchdog.beat()
    if proc.pid != announced:  # the spare died just before the hand-over; another took the job
        try:
            jobstore.set_pid(attempt.client, record.id, attempt.number, proc.pid)
        except redis.RedisError as e:  # the record shows the old pid; the job runs all the same
            log.warning("job %s: could not record its job process's pid: %s", record.id, e)
