"""The Celery task that runs one job attempt in a fresh, non-daemonic job process.

The worker process itself never imports torch or touches CUDA: it claims the job (a new
attempt, with its fencing token), hands the job process its spec and its own Redis user,
supervises it (`supervisor.py`), and records how it ended, through `jobstore`, only while the
attempt is still the job's.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import redis
from celery import states
from celery.exceptions import Ignore, Reject

from deepe_tasks.core import devices, jobstore, keys
from deepe_tasks.core.connection import get_redis
from deepe_tasks.core.errors import InvalidParams, JobFailed
from deepe_tasks.core.events import append_jsonl
from deepe_tasks.core.records import (
    Event,
    EventKind,
    JobStatus,
    Phase,
    RunResult,
    StopReason,
)
from deepe_tasks.core.settings import get_settings
from deepe_tasks.core.storage import (
    attempt_dir,
    job_dir,
    own_job_dir,
    remove_checkpoints,
    remove_staging,
)
from deepe_tasks.job.ipc import LOG_FILE, RESULT_FILE
from deepe_tasks.worker import credentials, watchdog
from deepe_tasks.worker.celery_app import app
from deepe_tasks.worker.handover import NotHandedOver, hand_over, retry_redis
from deepe_tasks.worker.lifecycle import UNSENT_GRACE, send_again, stop_worker
from deepe_tasks.worker.processes import (
    KILL_WAIT,
    JobProcess,
    crash_message,
    job_process,
    kill_group,
)
from deepe_tasks.worker.progress import FlowerProgress
from deepe_tasks.worker.supervisor import Attempt, Supervisor

log = logging.getLogger(__name__)

@app.task(name="deepe.train", bind=True)
def train(self: Any, job_id: str, method: str = "", gpus: int = 1) -> dict[str, Any]:
    """Run one attempt of a job; the job record and its events say how it went.

    ``method`` and ``gpus`` are not read: the job record has them. They are in the message so
    that Flower and `celery inspect` show which method a task runs, and on how many devices.
    """
    settings = get_settings()
    hostname = self.request.hostname or os.uname().nodename
    holder = f"{hostname}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    try:
        world_size = _world_size(job_id, hostname)
    except redis.RedisError as e:
        _hand_back(job_id, e)
    # A zygote's spare costs nothing until it is handed a job, so take it first: then the job
    # starts the moment it is ours. (Without a zygote this starts a process, ended if unused.)
    proc = job_process()
    on = f" on {world_size} devices" if world_size > 1 else ""
    started = Event(kind=EventKind.STARTED, job=job_id, message=f"started on {hostname}{on}", metrics={
        "pid": proc.pid, "warm": proc.warm, "forked": proc.forked, "process_started_at": proc.started_at,
        "world_size": world_size})
    try:
        claim = jobstore.claim(get_redis(), job_id, holder, settings.lease_key_ms, started,
                               worker=hostname, started_at=time.time(), pid=proc.pid)
    except redis.RedisError as e:
        # Whether the claim was made is unknown. If it was, the message sent again finds the
        # lease held and is dropped, and the reaper requeues the job once the lease expires.
        proc.discard()
        _hand_back(job_id, e)
    except BaseException:
        proc.discard()
        raise
    if claim.record is None:
        # A duplicate or late delivery: it touches nothing, not even Celery's result backend.
        proc.discard()
        _log_dropped(job_id, claim)
        raise Ignore()
    watchdog.busy(job_id)
    attempt = Attempt(claim.record, holder, settings)
    _best_effort(lambda: self.update_state(state=states.STARTED, meta={"job": job_id, "attempt": attempt.number}))
    folder = job_dir(settings.storage_root, job_id)
    started.attempt = started.metrics["attempt"] = attempt.number
    if attempt.number > 1:
        credentials.revoke(attempt.client, job_id, attempt.number - 1)
    try:
        unwritable = _storage_problem(settings.storage_root, job_id, attempt.number, claim.record.submitted_at)
        append_jsonl(folder / "events.jsonl", [started.to_json()])
        if unwritable or claim.source is None:
            proc.discard()
            result = _end(attempt, RunResult(
                status=JobStatus.FAILED, phase=Phase.PREPARING if unwritable else Phase.LOADING_METHOD,
                error=unwritable or f"The pinned source of {attempt.record.method} "
                                    f"({attempt.record.method_sha256[:12]}) is missing from Redis; submit the job again."),
                folder)
        else:
            result = _run_attempt(self, attempt, claim.source, proc, folder)
    finally:
        attempt.drop_credential()
        watchdog.idle()
        if settings.one_job:  # --one-job: this worker's job is done, however it went
            log.info("job %s ended and the worker runs one job only (--one-job); it stops", job_id)
            stop_worker()
    return _celery_outcome(self, job_id, result)


# A worker that took a job too large for it, or could not reach Redis to claim it, waits this
# long before it hands the message back.
MISROUTED_BACKOFF = 5.0


def _hand_back(job_id: str, e: redis.RedisError) -> NoReturn:
    """Give a message back to its queue unclaimed: Redis failed before the job was ours."""
    log.error("job %s: Redis failed before the job could be claimed (%s); its message goes back to the queue in "
              "%.0f s", job_id, e, MISROUTED_BACKOFF)
    time.sleep(MISROUTED_BACKOFF)
    raise Reject(f"Redis failed at the claim of job {job_id}: {e}", requeue=True) from e


def _world_size(job_id: str, hostname: str) -> int:
    """How many devices the job trains on; a job larger than this worker goes back to its queue.

    `deepe worker` consumes only the queues of jobs it can run; this catches a worker started
    with its queues given by hand (`celery worker -Q gpu.4gpus`).
    """
    try:
        owned = len(devices.device_list(get_settings().gpus))
    except InvalidParams as e:  # a `celery worker` started with a bad DEEPE_GPUS: it must not lose jobs
        log.error("%s The job %s goes back to its queue in %.0f s.", e, job_id, MISROUTED_BACKOFF)
        time.sleep(MISROUTED_BACKOFF)
        raise Reject(str(e), requeue=True) from e
    raw = get_redis().hget(keys.job(job_id), "gpus")
    wanted = int(str(raw)) if raw is not None and str(raw).isdigit() else 1
    if wanted > owned:
        log.error("job %s needs %d devices and this worker (%s) owns %d: it consumes a queue meant for larger "
                  "workers. Start workers with `deepe worker --gpus LIST`, which picks their queues; the job goes "
                  "back to its queue in %.0f s", job_id, wanted, hostname, owned, MISROUTED_BACKOFF)
        time.sleep(MISROUTED_BACKOFF)
        raise Reject(f"job {job_id} needs {wanted} devices; this worker owns {owned}", requeue=True)
    return wanted


def _log_dropped(job_id: str, claim: jobstore.Claim) -> None:
    if claim.outcome is jobstore.ClaimOutcome.MISSING:
        log.error("dropping message for job %s: it has no job record", job_id)
    elif claim.outcome is jobstore.ClaimOutcome.ENDED:
        log.info("dropping message for job %s: it is already %s", job_id, claim.detail)
    elif claim.outcome is jobstore.ClaimOutcome.CORRUPT:
        log.error("dropping message for job %s: %s, so it was not started; delete or repair that key",
                  job_id, claim.detail)
    else:
        log.warning("dropping message for job %s: %s holds its lease", job_id, claim.detail)


def _celery_outcome(task: Any, job_id: str, result: RunResult | None) -> dict[str, Any]:
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


def _run_attempt(task: Any, attempt: Attempt, source: str, proc: JobProcess, folder: Path) -> RunResult | None:
    settings = attempt.settings
    record = attempt.record
    own = attempt_dir(settings.storage_root, record.id, attempt.number)
    try:
        try:
            hand_over(attempt, source, proc)
        except NotHandedOver as e:
            log.error("job %s: attempt %d could not start: %s", record.id, attempt.number, e.result.error)
            not_started: NotHandedOver | None = e
        else:
            not_started = None
            ended_by = Supervisor(attempt, proc, progress=FlowerProgress(task, record.id).report).watch()
    finally:
        # Whatever happened, nothing of this attempt (DataLoader workers, torchrun children)
        # outlives it, nor its Redis user (gone before its end is recorded, so whoever sees the
        # job ended sees the user gone), nor what it staged and did not publish.
        kill_group(proc)
        attempt.drop_credential()
        remove_staging(Path(record.output_dir), record.id, [attempt.number])
    if not_started is not None:
        return _end(attempt, not_started.result, folder, preempted=not_started.preempted)
    if ended_by is StopReason.FENCED:
        return None
    result_path = own / RESULT_FILE
    if result_path.exists():
        result = RunResult.model_validate_json(result_path.read_text())
    elif ended_by is StopReason.CANCEL:
        result = RunResult(status=JobStatus.CANCELLED, phase=Phase.TRAINING,
                           error=f"cancelled; the job did not stop within DEEPE_CANCEL_GRACE="
                                 f"{settings.cancel_grace:g} s and was killed")
    elif ended_by is StopReason.TIME_LIMIT:
        result = RunResult(status=JobStatus.FAILED, phase=Phase.TRAINING,
                           error=f"time limit of {record.time_limit:g} s reached; the job did not stop within "
                                 f"DEEPE_CANCEL_GRACE={settings.cancel_grace:g} s and was killed")
    elif ended_by is StopReason.PREEMPT:
        result = RunResult(status=JobStatus.QUEUED, phase=Phase.TRAINING,
                           error="the worker shut down and the job did not checkpoint in time")
    elif ended_by is StopReason.CUT_OFF:
        result = RunResult(status=JobStatus.QUEUED, phase=Phase.TRAINING,
                           error=f"its worker could not reach Redis for DEEPE_LEASE_TTL={settings.lease_ttl:g} s")
    elif proc.zygote_died:
        # Not the job's doing: the worker's zygote died (killed, or chosen by the OOM killer)
        # and took its job process along. A loss, like a killed worker: the job resumes.
        result = RunResult(status=JobStatus.QUEUED, phase=Phase.TRAINING,
                           error="its worker's zygote died, and the job process with it")
    else:
        result = RunResult(status=JobStatus.FAILED, phase=Phase.RUNNING,
                           error=crash_message(proc.wait(KILL_WAIT), folder / LOG_FILE))
    return _end(attempt, result, folder, preempted=ended_by is StopReason.PREEMPT)


def _storage_problem(root: Path, job_id: str, number: int, submitted_at: float) -> str | None:
    """Why the attempt's folder on the shared storage cannot be written, or None if it can: a
    job that cannot write there fails at once, naming the storage, rather than being retried
    as if its worker had been lost. First the job folder is made this job's (an earlier job of
    the same id is moved aside), before anything of this attempt is written there."""
    own = attempt_dir(root, job_id, number)
    try:
        moved = own_job_dir(root, job_id, repr(submitted_at))
        if moved is not None:
            log.warning("job %s: the folder of an earlier job of that id (expired) was moved to %s", job_id, moved)
        own.mkdir(parents=True, exist_ok=True)
        probe = own / ".deepe-write-check"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        return (f"The job folder {own} cannot be written ({e.strerror or e}): DEEPE_STORAGE="
                f"{get_settings().storage_root} must be a writable shared mount on every worker. Fix the mount "
                "(or the worker's DEEPE_STORAGE), then submit the job again.")
    return None


def _best_effort(fn: Callable[[], object]) -> None:
    try:
        fn()
    except Exception as e:  # Redis or the result backend: a nicety, never the job's end
        log.warning("%s", e)


def _end(attempt: Attempt, result: RunResult, folder: Path, preempted: bool = False) -> RunResult | None:
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
    append_jsonl(folder / "events.jsonl", [final.to_json()])
    policy = attempt.settings.keep_checkpoints
    if policy == "never" or (policy == "unless-succeeded" and result.status is JobStatus.SUCCEEDED):
        remove_checkpoints(attempt.settings.storage_root, job_id)
    return result
