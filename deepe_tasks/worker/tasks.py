"""The Celery task that runs one job attempt in a fresh, non-daemonic job process.

The worker process itself never imports torch or touches CUDA: it claims the job (a new
attempt, with its fencing token), hands the job process its spec and its own Redis user,
supervises it (`supervisor.py`), and records how it ended, through `jobstore`, only while the
attempt is still the job's.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from celery import states

from deepe_tasks.core import broker
from deepe_tasks.core.broker import app
from deepe_tasks.core.events import append_jsonl
from deepe_tasks.core.ipc import RESULT_FILE
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
    remove_staging,
)
from deepe_tasks.worker import claiming, credentials, outcome, tracking, watchdog
from deepe_tasks.worker.handover import NotHandedOver, hand_over
from deepe_tasks.worker.lifecycle import stop_worker
from deepe_tasks.worker.processes import (
    JobProcess,
    job_process,
    kill_group,
)
from deepe_tasks.worker.progress import FlowerProgress
from deepe_tasks.worker.supervisor import Attempt, Supervisor

log = logging.getLogger(__name__)

@app.task(name=broker.TASK_NAME, bind=True)
def train(self: Any, job_id: str, method: str = "", gpus: int | None = None) -> dict[str, Any]:
    """Run one attempt of a job; the job record and its events say how it went.

    ``method`` is not read: the job record has it. It is in the message so that Flower and
    `celery inspect` show which method a task runs. ``gpus`` (the record's, copied into every
    message by `broker.enqueue`) spares a read of the record before the job starts.
    """
    settings = get_settings()
    hostname = self.request.hostname or os.uname().nodename
    holder = f"{hostname}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    try:
        world_size = claiming.world_size(job_id, hostname, gpus)
    except redis.RedisError as e:
        claiming.hand_back(job_id, e)
    # A zygote's spare costs nothing until it is handed a job, so take it first: then the job
    # starts the moment it is ours. (Without a zygote this starts a process, ended if unused.)
    proc = job_process()
    on = f" on {world_size} devices" if world_size > 1 else ""
    started = Event(kind=EventKind.STARTED, job=job_id, message=f"started on {hostname}{on}", metrics={
        "pid": proc.pid, "warm": proc.warm, "forked": proc.forked, "process_started_at": proc.started_at,
        "world_size": world_size})
    claim = claiming.claim(job_id, holder, settings, started, hostname, proc)
    assert claim.record is not None
    watchdog.busy(job_id)
    attempt = Attempt(claim.record, holder, settings)
    if settings.mlflow_uri:
        _best_effort(lambda: tracking.register(attempt.client, job_id))
    _best_effort(lambda: self.update_state(state=states.STARTED, meta={"job": job_id, "attempt": attempt.number}))
    folder = job_dir(settings.storage_root, job_id)
    started.attempt = started.metrics["attempt"] = attempt.number
    if attempt.number > 1:
        credentials.revoke(attempt.client, job_id, attempt.number - 1)
    try:
        unwritable = claiming.storage_problem(settings.storage_root, job_id, attempt.number,
                                              claim.record.submitted_at)
        append_jsonl(folder / "events.jsonl", [started.to_json()])
        taken = None if unwritable else claiming.taken_by(settings.storage_root, attempt)
        if taken is not None:
            proc.discard()
            result = outcome.end(attempt, taken, folder, preempted=True)
        elif unwritable or claim.source is None:
            proc.discard()
            result = outcome.end(attempt, RunResult(
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
    return outcome.celery_outcome(self, job_id, result)


def _run_attempt(task: Any, attempt: Attempt, source: str, proc: JobProcess, folder: Path) -> RunResult | None:
    record = attempt.record
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
        return outcome.end(attempt, not_started.result, folder, preempted=not_started.preempted)
    if ended_by is StopReason.FENCED:
        return None
    result_path = attempt_dir(attempt.settings.storage_root, record.id, attempt.number) / RESULT_FILE
    if result_path.exists():
        result = RunResult.model_validate_json(result_path.read_text())
    else:
        result = outcome.unreported(attempt, ended_by, proc, folder)
    return outcome.end(attempt, result, folder, preempted=ended_by is StopReason.PREEMPT)


def _best_effort(fn: Callable[[], object]) -> None:
    try:
        fn()
    except Exception as e:  # Redis or the result backend: a nicety, never the job's end
        log.warning("%s", e)
