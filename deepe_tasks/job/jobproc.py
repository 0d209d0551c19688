"""The job process: one fresh process per attempt.

With a warm worker it is forked from the zygote (`zygote.py`), which has the training stack
imported already. With `--no-warm` it is started for the job: it imports the stack, then
reads its job spec from stdin.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import redis

from deepe_tasks.core import keys
from deepe_tasks.core.connection import connect
from deepe_tasks.core.events import EventPublisher
from deepe_tasks.core.ipc import CUTOFF_SIGNAL, FENCED_EXIT, LOG_FILE, PREEMPT_SIGNAL, RESULT_FILE
from deepe_tasks.core.records import JobKind, JobSpec, JobStatus, Phase, RunResult, StopReason
from deepe_tasks.core.settings import get_settings
from deepe_tasks.core.storage import attempt_dir, job_dir, own_job_dir
from deepe_tasks.job import evaljob, merge, mlflow_env, preload, ranks, remote, runner
from deepe_tasks.job.stops import PublishFence, StopFlags


def _redirect_output(folder: Path) -> None:
    """Send this process's stdout and stderr (the method's prints, warnings) to the job's log."""
    fd = os.open(folder / LOG_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def write_result(folder: Path, result: RunResult, name: str = RESULT_FILE) -> None:
    tmp = folder / f".{name}.tmp"
    tmp.write_text(result.model_dump_json())
    os.replace(tmp, folder / name)


def main() -> int:
    preload.warm_up()
    line = sys.stdin.readline()
    if not line:
        return 0  # the worker closed our stdin without a job
    return run(line)


def _fenced() -> None:
    # Another attempt owns the job: this one must not write another byte anywhere.
    logging.error("this attempt was replaced by another (its lease was lost); it stops now")
    sys.stderr.flush()
    os._exit(FENCED_EXIT)


def _client(spec: JobSpec, timeout: float) -> redis.Redis:
    url = spec.redis_url or ""
    return connect(url, username=spec.redis_username, password=spec.redis_password, decode_responses=True,
                   socket_timeout=timeout, socket_connect_timeout=timeout)


def _incarnation(spec: JobSpec) -> str | None:
    """The job's submit time, from its record: what tells it from an earlier job of the same id.
    None if Redis did not answer within a lease TTL."""
    client = _client(spec, timeout=5)
    deadline = time.monotonic() + spec.lease_ttl
    try:
        while True:
            try:
                value = client.hget(keys.job(spec.job_id), "submitted_at")
                return None if value is None else str(value)
            except redis.RedisError as e:
                if time.monotonic() > deadline:
                    logging.error("could not read the job's record: %s", e)
                    return None
                time.sleep(0.5)
    finally:
        client.close()


def _replication(spec: JobSpec) -> None:
    """Acknowledge this attempt's events and publish check as its worker does (the settings read
    them from the environment: this process's lacks the worker's DEEPE_REDIS_URL)."""
    os.environ["DEEPE_REDIS_MIN_REPLICAS"] = str(spec.min_replicas)
    os.environ["DEEPE_REDIS_REPLICATION_TIMEOUT"] = str(spec.replication_timeout)
    get_settings.cache_clear()


def _start(spec: JobSpec, attempt: Path) -> str | None:
    """The job's incarnation (``_incarnation``); None if the attempt must not start (its result
    is written then)."""
    # An attempt number runs once per job, so a result already there is an earlier job's: it
    # must not be read as this attempt's should this process die before its own is written.
    with contextlib.suppress(FileNotFoundError):
        os.replace(attempt / RESULT_FILE, attempt / f"{RESULT_FILE}.expired")
    incarnation = _incarnation(spec)
    if incarnation is None:
        attempt.mkdir(parents=True, exist_ok=True)
        write_result(attempt, RunResult(status=JobStatus.QUEUED, phase=Phase.PREPARING, error=(
            f"its job process could not reach Redis for DEEPE_LEASE_TTL={spec.lease_ttl:g} s to read the job")))
    return incarnation


def run(line: str) -> int:
    """Run the job whose spec (JSON) is ``line``; how it ended goes to the attempt's folder."""
    spec = JobSpec.model_validate_json(line)
    _replication(spec)
    folder = job_dir(Path(spec.storage_root), spec.job_id)
    attempt = attempt_dir(Path(spec.storage_root), spec.job_id, spec.attempt)
    incarnation = _start(spec, attempt)
    if incarnation is None:
        return 0
    # An earlier job of the same id (its record expired) left its folder: it is moved aside (the
    # worker did so already; a job process started by an older worker does it here).
    try:
        moved = own_job_dir(Path(spec.storage_root), spec.job_id, incarnation)
        attempt.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        with contextlib.suppress(OSError):
            write_result(attempt, RunResult(status=JobStatus.QUEUED, phase=Phase.PREPARING, error=(
                f"the job folder {folder} could not be made ready ({e}); the job is handed back")))
        return 0
    os.chdir(folder)  # stray relative writes of a method land in its job folder
    _redirect_output(folder)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    mlflow_env.prepare(spec)  # a method's own report_to="mlflow" goes to deepe's server, tagged with the job
    local = _localized(spec, attempt)
    if local is None:
        return 0
    spec = local
    # A multi-device job: the other ranks are forked now, while this process has no thread of its own.
    others = ranks.Ranks.start(spec, attempt, run_rank) if spec.world_size > 1 else None
    if moved is not None:
        logging.warning("the folder of an earlier job %s (expired) was moved to %s", spec.job_id, moved)

    client = _client(spec, timeout=5)
    publisher = EventPublisher(client, spec.job_id, spec.attempt, jsonl=folder / "events.jsonl",
                               max_buffer=spec.event_buffer, on_fenced=_fenced)
    # The cancel flag is read on the training thread: during an outage that read must fail
    # fast, not stall a step for the usual timeouts.
    flags = StopFlags(_client(spec, timeout=0.2), spec)
    signal.signal(PREEMPT_SIGNAL, flags.on_signal)
    signal.signal(CUTOFF_SIGNAL, flags.on_signal)

    fence = PublishFence(client, spec)
    job = _runner(spec, publisher, flags, fence)
    if others is not None:
        others.watch(lambda error: _rank_failed(attempt, publisher, job, error))
    try:
        result = job.run()
    except BaseException as e:  # the runner reports method errors itself; this is for its own
        logging.exception("the runner failed")
        result = RunResult(status=JobStatus.FAILED, phase=Phase.RUNNING,
                           error=f"The job process failed outside the method: {type(e).__name__}: {e}")
    if others is not None:
        failed = result.status is JobStatus.FAILED and not job.stopped
        # A failure here may be a rank's death seen first as a vanished peer: give the watcher
        # a moment to say so, since the rank's death is the better error.
        if failed:
            others.failed.wait(3.0)
        others.stop(2.0 if failed else ranks.EXIT_GRACE)
    _finish(spec, attempt, result, publisher, cut_off=flags.signalled is StopReason.CUT_OFF or fence.refused)
    return 0


def _localized(spec: JobSpec, attempt: Path) -> JobSpec | None:
    """On an object store: the spec with local paths, its inputs and newest checkpoint fetched;
    None if that failed (the attempt's result says why). On a folder: the spec as it is."""
    try:
        return remote.start(spec)
    except Exception as e:
        logging.exception("the job's inputs could not be fetched")
        write_result(attempt, RunResult(status=JobStatus.FAILED, phase=Phase.PREPARING,
                                        error=f"Failed while {Phase.PREPARING}: {e}"))
        return None


JobRunner = runner.Runner | merge.MergeRunner | evaljob.EvalRunner


def _runner(spec: JobSpec, publisher: EventPublisher, flags: StopFlags, fence: PublishFence) -> JobRunner:
    """The runner of the job's kind: both run(), stop at the flags and publish behind the fence."""
    if spec.kind is JobKind.EVAL:
        return evaljob.EvalRunner(spec, publisher.emit, lambda: flags.check(fresh=True), may_publish=fence)
    if spec.kind is JobKind.MERGE:
        # A merge has no step boundary to wait for: each of its checks reads the flag afresh.
        return merge.MergeRunner(spec, publisher.emit, lambda: flags.check(fresh=True), may_publish=fence)
    return runner.Runner(spec, publisher.emit, flags.check, may_publish=fence)


def _finish(spec: JobSpec, attempt: Path, result: RunResult, publisher: EventPublisher, cut_off: bool) -> None:
    """Flush the attempt's events, then write its result (which the worker reads)."""
    # Held by _rank_failed while it records a rank's death as the job's end and kills every
    # rank, this process included: then this wait never ends, as it should.
    _ended.acquire()
    # The worker writes the final event; ours must be in the stream before it. Cut off from
    # Redis, or refused as stale, this attempt waits no longer than a lease for it.
    if not publisher.close(timeout=spec.lease_ttl if cut_off else 300):
        logging.warning("some events reached events.jsonl but not Redis")
    store = remote.active()
    if store is not None:  # the last checkpoint on the store before another worker may resume it
        store.end()
    write_result(attempt, result)
    sys.stdout.flush()
    sys.stderr.flush()


_ended = threading.Lock()


def _rank_failed(attempt: Path, publisher: EventPublisher, job: JobRunner,
                 error: str) -> None:
    """Another rank died while the job trained: record the job's end, then end every rank.

    The ranks left would wait for it in their next collective for as long as its timeout (half
    an hour), so they are killed, with this process: the worker reads the result and records it.
    """
    if job.tracker.phase is Phase.SAVING and not job.collective_save:  # rank 0 alone saves: it needs no peer
        logging.warning("after training: %s", error)
        return
    if not _ended.acquire(blocking=False):
        return
    result = RunResult(status=JobStatus.FAILED, phase=job.tracker.phase, error=error)
    logging.error("%s", error)
    try:
        publisher.close(timeout=2.0)
        write_result(attempt, result)
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os.killpg(os.getpgrp(), signal.SIGKILL)


def run_rank(spec: JobSpec, rank: int) -> int:
    """Rank ``rank`` (> 0) of a multi-device job: train beside rank 0, which speaks for the job.

    It publishes nothing and saves nothing; a failure goes to its rank file, for rank 0's report.
    """
    attempt = attempt_dir(Path(spec.storage_root), spec.job_id, spec.attempt)
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s %(levelname)s rank {rank} %(name)s: %(message)s",
                        force=True)
    job = runner.Runner(spec, lambda event: None, rank=rank)
    try:
        result = job.run()
    except BaseException as e:
        logging.exception("the runner failed")
        result = RunResult(status=JobStatus.FAILED, error=f"rank {rank} failed: {type(e).__name__}: {e}")
    # A stop that rank 0 decided (a time limit, a cancel) is rank 0's to report; any other
    # failure of this rank, even while it stops, is its own.
    if result.status is JobStatus.FAILED and not job.stopped:
        write_result(attempt, result, name=ranks.rank_file(attempt, rank).name)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
