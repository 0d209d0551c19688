"""Before a claimed job is the worker's: its size checked, its claim made, and what to do when
Redis fails on the way (the message goes back to its queue) or the job folder cannot be written."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import NoReturn

import redis
from celery.exceptions import Ignore, Reject

from deepe_tasks.core import devices, jobstore, keys
from deepe_tasks.core.connection import get_redis
from deepe_tasks.core.errors import InvalidParams
from deepe_tasks.core.fences import mark_attempt, mark_attempt_on
from deepe_tasks.core.objects import ObjectStore, StorageError
from deepe_tasks.core.records import Event, JobStatus, Phase, RunResult
from deepe_tasks.core.settings import Settings, get_settings
from deepe_tasks.core.storage import JOB_MARKER, attempt_dir, job_dir, own_job_dir
from deepe_tasks.worker.processes import JobProcess
from deepe_tasks.worker.supervisor import Attempt

log = logging.getLogger(__name__)


def claim(job_id: str, holder: str, settings: Settings, started: Event, hostname: str,
          proc: JobProcess) -> jobstore.Claim:
    """Claim the job for a new attempt; a duplicate or late delivery is dropped (Ignore) and a
    Redis failure hands the message back (Reject), the job process discarded either way."""
    try:
        made = jobstore.claim(get_redis(), job_id, holder, settings.lease_key_ms, started,
                              worker=hostname, started_at=time.time(), pid=proc.pid)
    except redis.RedisError as e:
        # Whether the claim was made is unknown. If it was, the message sent again finds the
        # lease held and is dropped, and the reaper requeues the job once the lease expires.
        proc.discard()
        hand_back(job_id, e)
    except BaseException:
        proc.discard()
        raise
    if made.record is None:
        # A duplicate or late delivery: it touches nothing, not even Celery's result backend.
        proc.discard()
        _log_dropped(job_id, made)
        raise Ignore()
    return made


# A worker that took a job too large for it, or could not reach Redis to claim it, waits this
# long before it hands the message back.
MISROUTED_BACKOFF = 5.0


def hand_back(job_id: str, e: redis.RedisError) -> NoReturn:
    """Give a message back to its queue unclaimed: Redis failed before the job was ours."""
    log.error("job %s: Redis failed before the job could be claimed (%s); its message goes back to the queue in "
              "%.0f s", job_id, e, MISROUTED_BACKOFF)
    time.sleep(MISROUTED_BACKOFF)
    raise Reject(f"Redis failed at the claim of job {job_id}: {e}", requeue=True) from e


def world_size(job_id: str, hostname: str, gpus: int | None = None) -> int:
    """How many devices the job trains on; a job larger than this worker goes back to its queue.

    ``gpus``: what the job's message says (`broker.enqueue` writes the record's); None for a
    message without it, and then the record is read. `deepe worker` consumes only the queues of
    jobs it can run; this catches a worker started with its queues given by hand
    (`celery worker -Q gpu.4gpus`).
    """
    try:
        owned = len(devices.device_list(get_settings().gpus))
    except InvalidParams as e:  # a `celery worker` started with a bad DEEPE_GPUS: it must not lose jobs
        log.error("%s The job %s goes back to its queue in %.0f s.", e, job_id, MISROUTED_BACKOFF)
        time.sleep(MISROUTED_BACKOFF)
        raise Reject(str(e), requeue=True) from e
    if isinstance(gpus, int) and not isinstance(gpus, bool) and gpus >= 1:
        wanted = gpus
    else:
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


def storage_problem(root: Path, job_id: str, number: int, submitted_at: float) -> str | None:
    """Why the attempt's folder on the shared storage cannot be written, or None if it can: a
    job that cannot write there fails at once, naming the storage, rather than being retried
    as if its worker had been lost. First the job folder is made this job's (an earlier job of
    the same id is moved aside), before anything of this attempt is written there."""
    own = attempt_dir(root, job_id, number)
    storage_url = get_settings().storage_url
    if storage_url is not None:
        problem = stored_job_problem(storage_url, job_id, submitted_at)
        if problem is not None:
            return problem
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




def stored_job_problem(storage_url: str, job_id: str, submitted_at: float) -> str | None:
    """Why the job's folder on the object store is not this job's, or None once it is: an earlier
    job of the same id (its record expired) left files there, which a store cannot move aside."""
    store = ObjectStore(storage_url)
    rel = job_dir(Path(""), job_id).as_posix()
    marker = (json.dumps({"job": job_id, "submitted_at": repr(submitted_at)}) + "\n").encode()
    try:
        if store.create(f"{rel}/{JOB_MARKER}", marker):
            return None
        owner = (store.read_json(f"{rel}/{JOB_MARKER}") or {}).get("submitted_at")
    except StorageError as e:
        return f"The job folder {store.url_of(rel)} cannot be written ({e}). Fix the store or its credentials, then submit the job again."
    try:
        if owner is not None and float(owner) == float(submitted_at):
            return None
    except (TypeError, ValueError):
        pass
    return (f"{store.url_of(rel)} holds the files of an earlier job {job_id} (submitted at {owner}), whose record "
            "expired; an object store cannot move them aside. Delete that folder, or submit the job with another id.")


def taken_by(root: Path, attempt: Attempt) -> RunResult | None:
    """The attempt's folder marked as its claim's (`core.fences`); where another claim of the
    same attempt number marked it first (Redis handed the number out twice: a failover that
    lost a claim), how this attempt ends: handed back, so that the next claim gets a new number."""
    storage_url = attempt.settings.storage_url
    try:
        if storage_url is not None:  # the same exclusive create, on the object store
            folder = attempt_dir(Path(""), attempt.job_id, attempt.number).as_posix()
            other = mark_attempt_on(ObjectStore(storage_url), folder, attempt.holder)
        else:
            other = mark_attempt(attempt_dir(root, attempt.job_id, attempt.number), attempt.holder)
    except (OSError, StorageError) as e:
        other = f"(its claim marker could not be written: {e})"
    if other is None:
        return None
    error = (f"attempt {attempt.number} of job {attempt.job_id} was claimed before by {other}; Redis handed the "
             "number out twice (a failover to a replica that missed a claim?), so this claim hands the job back")
    log.error("%s", error)
    return RunResult(status=JobStatus.QUEUED, phase=Phase.PREPARING, error=error)
