"""How an attempt's end is recorded: in Redis (only while the attempt still owns the job), in
the job folder's events.jsonl, and as the Celery state Flower shows."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import redis
from celery import states
from celery.exceptions import Ignore

from deepe_tasks.core import jobstore, validate
from deepe_tasks.core.errors import JobFailed
from deepe_tasks.core.events import append_jsonl
from deepe_tasks.core.ipc import LOG_FILE
from deepe_tasks.core.objects import ObjectStore
from deepe_tasks.core.records import Event, EventKind, JobStatus, Phase, RunResult, StopReason
from deepe_tasks.core.storage import job_dir, remove_checkpoints
from deepe_tasks.worker.handover import retry_redis
from deepe_tasks.worker.lifecycle import UNSENT_GRACE, send_again
from deepe_tasks.worker.processes import KILL_WAIT, JobProcess, crash_message
from deepe_tasks.worker.supervisor import Attempt

log = logging.getLogger(__name__)


def celery_outcome(task: Any, job_id: str, result: RunResult | None) -> dict[str, Any]:
    """Celery's state of the task, from how the attempt ended (Flower shows it)."""
    if result is None:  # fenced off: another attempt owns the job and its Celery state
        raise Ignore()
    if result.status is JobStatus.FAILED:
        raise JobFailed(result.error or "the job failed")
    if result.status is JobStatus.CANCELLED:
        task.update_state(state=states.REVOKED, meta={"job": job_id, "step": result.step})
        raise Ignore()
    if result.status is JobStatus.QUEUED:  # requeued: another message carries the job on
        task.update_state(state="REQUEUED", meta={"job": job_id, "step": result.step})
        raise Ignore()
    return {"job": job_id, "status": result.status.value, "output_dir": result.output_dir,
            "metrics": result.metrics}


def end(attempt: Attempt, result: RunResult, folder: Path, preempted: bool = False) -> RunResult | None:
    """Record how the attempt ended, if it still owns the job; None if another attempt does.
    A ``preempted`` attempt (its worker was told to stop) does not count toward DEEPE_MAX_RESUMES."""
    job_id = attempt.job_id
    if result.status is JobStatus.QUEUED:
        try:
            # Cut off, wait about a lease for Redis; beyond that the reaper requeues the job.
            outcome = retry_redis(lambda: attempt.requeue(result.error or "the worker shut down", preempted),
                             timeout=attempt.settings.lease_ttl)
        except redis.RedisError:
            log.error("job %s: Redis stayed away; the reaper will requeue the job", job_id)
            return None
        if outcome is jobstore.RequeueOutcome.STALE:
            log.error("job %s: attempt %d was replaced by another; not recording its end", job_id, attempt.number)
            return None
        if outcome is jobstore.RequeueOutcome.QUEUED:
            try:
                send_again(attempt.client, attempt.record)
            except Exception as e:
                log.error("job %s: its message could not be sent (%s); a reaper sends it within %.0f s",
                          job_id, e, UNSENT_GRACE)
            return result
        status = JobStatus.CANCELLED if outcome is jobstore.RequeueOutcome.CANCELLED else JobStatus.FAILED
        return result.model_copy(update={"status": status})
    kind = {JobStatus.SUCCEEDED: EventKind.SUCCEEDED, JobStatus.CANCELLED: EventKind.CANCELLED}.get(
        result.status, EventKind.FAILED)
    message = result.error or (f"model saved to {result.output_dir}" if result.output_dir else "")
    final = Event(kind=kind, job=job_id, step=result.step, metrics=result.metrics, message=message,
                  attempt=attempt.number)
    def record_end() -> bool:
        # The supervisor no longer renews the lease: keep it (or take it back) while the end is
        # recorded, so that no reaper requeues a job that is done.
        if attempt.renew() is jobstore.Renewal.FENCED:
            return False
        return attempt.finish(result, final)

    # The job process flushed its events before it exited: the final event comes after them.
    if not retry_redis(record_end, timeout=300):
        log.error("job %s: attempt %d was replaced by another; not recording its end", job_id, attempt.number)
        return None
    try:
        # Not part of record_end: the end is recorded on the primary already, and a second
        # FINISH would find the job ended (not this attempt's any more).
        retry_redis(lambda: jobstore.barrier(attempt.client, job_id, f"The end of job {job_id}"), timeout=60)
    except redis.RedisError as e:
        log.error("job %s: its end is recorded on the Redis primary, but no replica acknowledged it (%s). A "
                  "failover now could roll it back; a later attempt then finds the published model and does "
                  "not train again", job_id, e)
    append_jsonl(folder / "events.jsonl", [final.to_json()])
    policy = attempt.settings.keep_checkpoints
    if policy == "never" or (policy == "unless-succeeded" and result.status is JobStatus.SUCCEEDED):
        remove_checkpoints(attempt.settings.storage_root, job_id)
        if attempt.settings.storage_url is not None:
            _remove_stored_checkpoints(attempt.settings.storage_url, job_id)
    return result


def _remove_stored_checkpoints(storage_url: str, job_id: str) -> None:
    """DEEPE_KEEP_CHECKPOINTS on the object store: every attempt's checkpoints there go too."""
    store = ObjectStore(storage_url)
    try:
        for folder in store.glob(f"{job_dir(Path(''), job_id).as_posix()}/attempts/*/checkpoints"):
            store.remove(folder)
    except Exception as e:  # a lifecycle rule, or the next job's end, removes them later
        log.warning("job %s: its checkpoints on %s could not be removed: %s", job_id, storage_url, e)


def unreported(attempt: Attempt, ended_by: StopReason | None, proc: JobProcess, folder: Path) -> RunResult:
    """How an attempt ended whose job process wrote no result: from why the Supervisor stopped
    watching it, or from how the process died."""
    settings, record = attempt.settings, attempt.record
    if ended_by is StopReason.CANCEL:
        return RunResult(status=JobStatus.CANCELLED, phase=Phase.TRAINING,
                         error=f"cancelled; the job did not stop within DEEPE_CANCEL_GRACE="
                               f"{settings.cancel_grace:g} s and was killed")
    if ended_by is StopReason.TIME_LIMIT:
        return RunResult(status=JobStatus.FAILED, phase=Phase.TRAINING,
                         error=f"time limit of {validate.duration(record.time_limit or 0)} reached; the job did not stop within "
                               f"DEEPE_CANCEL_GRACE={settings.cancel_grace:g} s and was killed")
    if ended_by is StopReason.PREEMPT:
        return RunResult(status=JobStatus.QUEUED, phase=Phase.TRAINING,
                         error="the worker shut down and the job did not checkpoint in time")
    if ended_by is StopReason.CUT_OFF:
        return RunResult(status=JobStatus.QUEUED, phase=Phase.TRAINING,
                         error=f"its worker could not reach Redis for DEEPE_LEASE_TTL={settings.lease_ttl:g} s")
    if proc.zygote_died:
        # Not the job's doing: the worker's zygote died (killed, or chosen by the OOM killer)
        # and took its job process along. A loss, like a killed worker: the job resumes.
        return RunResult(status=JobStatus.QUEUED, phase=Phase.TRAINING,
                         error="its worker's zygote died, and the job process with it")
    return RunResult(status=JobStatus.FAILED, phase=Phase.RUNNING,
                     error=crash_message(proc.wait(KILL_WAIT), folder / LOG_FILE))
