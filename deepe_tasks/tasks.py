"""The Celery task that runs one job attempt in a fresh, non-daemonic job process.

The worker process itself never imports torch or touches CUDA: it spawns the job process,
keeps the lease alive while it runs, and records how it ended.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from celery import states
from celery.exceptions import Ignore

from . import jobs, keys
from .celery_app import app
from .connection import get_redis
from .errors import JobFailed, JobNotFound
from .events import EventPublisher
from .jobproc import LOG, RESULT
from .lease import Lease
from .records import Event, EventKind, JobSpec, JobStatus, RunResult
from .settings import get_settings
from .storage import job_dir

log = logging.getLogger(__name__)

TAIL_LINES = 15
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the job process, before exec: get SIGKILL when the worker dies, so no orphan trains on."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace").rstrip().splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def _crash_message(returncode: int, log_path: Path) -> str:
    if returncode < 0:
        name = signal.Signals(-returncode).name
        why = f"was killed by {name}"
        if name == "SIGKILL":
            why += " (the kernel's out-of-memory killer does this when a job uses too much memory)"
        elif name == "SIGSEGV":
            why += " (a crash in native code, such as a CUDA or tokenizer library)"
    else:
        why = f"exited with code {returncode} before reporting a result (did the method call os._exit?)"
    tail = _tail(log_path)
    return f"The job process {why}." + (f" Last output:\n{tail}" if tail else "")


def spawn_job_process(env_overrides: dict[str, str]) -> subprocess.Popen[str]:
    env = {**os.environ, **env_overrides}
    return subprocess.Popen(
        [sys.executable, "-m", "deepe_tasks.jobproc"],
        stdin=subprocess.PIPE, text=True, env=env,
        start_new_session=True,  # its own process group, so a kill takes its DataLoader workers too
        preexec_fn=_die_with_parent,
    )


@app.task(name="deepe.train", bind=True)
def train(self: Any, job_id: str, method: str = "") -> dict[str, Any]:
    """Run one attempt of a job; the job record and its events say how it went."""
    settings = get_settings()
    client = get_redis()
    try:
        record = jobs.get(client, job_id)
    except JobNotFound:
        log.error("dropping message for job %s: it has no job record", job_id)
        raise Ignore() from None
    if record.status.is_final:
        log.info("dropping message for job %s: it is already %s", job_id, record.status.value)
        raise Ignore()
    lease = Lease(client, job_id, settings.lease_ttl)
    if not lease.acquire():
        log.warning("dropping message for job %s: %s holds its lease", job_id, lease.holder())
        raise Ignore()

    folder = job_dir(settings.storage_root, job_id)
    folder.mkdir(parents=True, exist_ok=True)
    publisher = EventPublisher(client, job_id, jsonl=folder / "events.jsonl", max_buffer=settings.event_buffer)
    try:
        result = _run_attempt(self, client, record.model_copy(), lease, publisher, folder)
    finally:
        lease.release()
    publisher.close(timeout=300)
    if result.status is JobStatus.FAILED:
        raise JobFailed(result.error or "the job failed")
    if result.status is JobStatus.CANCELLED:
        self.update_state(state=states.REVOKED, meta={"job": job_id, "step": result.step})
        raise Ignore()
    return {"job": job_id, "status": result.status.value, "output_dir": result.output_dir,
            "metrics": result.metrics}


def _run_attempt(task: Any, client: Any, record: Any, lease: Lease, publisher: EventPublisher,
                 folder: Path) -> RunResult:
    settings = get_settings()
    job_id = record.id
    hostname = task.request.hostname or os.uname().nodename
    source = client.get(keys.method_source(record.method_sha256))
    now = time.time()
    if not jobs.transition(client, job_id, {JobStatus.QUEUED, JobStatus.RUNNING}, status=JobStatus.RUNNING,
                           worker=hostname, started_at=now, attempts=record.attempts + 1):
        log.info("dropping job %s: it ended before it could start", job_id)
        return RunResult(status=jobs.status(client, job_id), phase="starting")
    publisher.emit(Event(kind=EventKind.STARTED, job=job_id, message=f"started on {hostname}",
                         metrics={"attempt": record.attempts + 1}))
    if source is None:
        result = RunResult(status=JobStatus.FAILED, phase="loading the method",
                           error=f"The pinned source of {record.method} ({record.method_sha256[:12]}) "
                                 "is missing from Redis; submit the job again.")
        return _finish(client, job_id, result, publisher)

    (folder / RESULT).unlink(missing_ok=True)
    spec = JobSpec(job_id=job_id, method=record.method, method_sha256=record.method_sha256, source=source,
                   params=record.params, storage_root=str(settings.storage_root),
                   redis_url=settings.redis_url, worker=hostname, started_at=now)
    env = {"CUDA_VISIBLE_DEVICES": settings.gpus} if settings.gpus is not None else {}
    proc = spawn_job_process(env)
    assert proc.stdin is not None
    proc.stdin.write(spec.model_dump_json() + "\n")
    proc.stdin.close()
    _supervise(client, job_id, proc, lease)

    result_path = folder / RESULT
    if result_path.exists():
        result = RunResult.model_validate_json(result_path.read_text())
    else:
        result = RunResult(status=JobStatus.FAILED, phase="running the job process",
                           error=_crash_message(proc.returncode, folder / LOG))
    return _finish(client, job_id, result, publisher)


def _supervise(client: Any, job_id: str, proc: subprocess.Popen[str], lease: Lease) -> None:
    """Wait for the job process, renewing the lease; kill its group if a cancel is not obeyed."""
    settings = get_settings()
    renew_every = settings.lease_ttl / 3
    next_renew = time.monotonic() + renew_every
    cancel_seen: float | None = None
    while True:
        try:
            proc.wait(timeout=0.5)
            return
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        try:
            if now >= next_renew:
                lease.renew()
                next_renew = now + renew_every
            if cancel_seen is None and client.exists(keys.cancel(job_id)):
                cancel_seen = now
        except Exception as e:  # a Redis outage must not end the job
            log.warning("job %s: could not reach Redis: %s", job_id, e)
        if cancel_seen is not None and now - cancel_seen > settings.cancel_grace:
            log.warning("job %s did not stop within %.0f s of its cancel; killing it", job_id, settings.cancel_grace)
            _kill_group(proc)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _finish(client: Any, job_id: str, result: RunResult, publisher: EventPublisher) -> RunResult:
    kind = {JobStatus.SUCCEEDED: EventKind.SUCCEEDED, JobStatus.CANCELLED: EventKind.CANCELLED}.get(
        result.status, EventKind.FAILED)
    message = result.error or (f"model saved to {result.output_dir}" if result.output_dir else "")
    publisher.emit(Event(kind=kind, job=job_id, step=result.step, metrics=result.metrics, message=message))
    # The final event is in the stream before the record says the job ended, so whoever
    # waits on the record finds the whole history.
    publisher.flush(timeout=300)
    jobs.update(client, job_id, status=result.status, error=result.error, finished_at=time.time(),
                metrics=result.metrics, output_dir=result.output_dir)
    return result
