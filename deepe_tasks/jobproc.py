"""The job process: one fresh process per attempt.

With a warm worker it is forked from the zygote (`zygote.py`), which has the training stack
imported already. With `--no-warm` it is started for the job: it imports the stack, then
reads its job spec from stdin.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path

import redis

from . import keys, runner
from .events import EventPublisher
from .protocol import LOG_FILE, PREEMPT_SIGNAL, RESULT_FILE
from .records import JobSpec, JobStatus, RunResult
from .settings import get_settings, redis_ssl_options
from .storage import job_dir

CANCEL_READ_INTERVAL = 1.0


def _redirect_output(folder: Path) -> None:
    """Send this process's stdout and stderr (the method's prints, warnings) to the job's log."""
    fd = os.open(folder / LOG_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


class StopFlags:
    """Why this job should stop, checked by the callback on every step.

    Preemption arrives as a signal from the worker and the time limit is a clock: neither
    costs anything. The cancel flag is in Redis, read at most once a second.
    """

    def __init__(self, client: redis.Redis, spec: JobSpec) -> None:
        self.client = client
        self.key = keys.cancel(spec.job_id)
        self.deadline = time.monotonic() + spec.time_limit if spec.time_limit else None
        self.preempted = False
        self._next_read = 0.0
        self._cancel: str | None = None

    def preempt(self, signum: int, frame: object) -> None:
        self.preempted = True

    def check(self) -> str | None:
        if self.preempted:
            return "preempt"
        now = time.monotonic()
        if self.deadline is not None and now >= self.deadline:
            return "time-limit"
        if now >= self._next_read:
            self._next_read = now + CANCEL_READ_INTERVAL
            try:
                value = self.client.get(self.key)
            except redis.RedisError:
                value = None  # a Redis outage must not stop training
            if value is not None:
                self._cancel = "cancel-save" if value == "save" else "cancel"
        return self._cancel


def write_result(folder: Path, result: RunResult) -> None:
    tmp = folder / f".{RESULT_FILE}.tmp"
    tmp.write_text(result.model_dump_json())
    os.replace(tmp, folder / RESULT_FILE)


def main() -> int:
    runner.warm_up()
    line = sys.stdin.readline()
    if not line:
        return 0  # the worker closed our stdin without a job
    return run(line)


def run(line: str) -> int:
    """Run the job whose spec (JSON) is ``line``; how it ended goes to the job folder."""
    spec = JobSpec.model_validate_json(line)
    folder = job_dir(Path(spec.storage_root), spec.job_id)
    folder.mkdir(parents=True, exist_ok=True)
    os.chdir(folder)  # stray relative writes of a method land in its job folder
    _redirect_output(folder)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    tls = redis_ssl_options(get_settings().model_copy(update={"redis_url": spec.redis_url or ""}))
    client = redis.Redis.from_url(spec.redis_url or "", decode_responses=True,
                                  socket_timeout=5, socket_connect_timeout=2, **(tls or {}))
    publisher = EventPublisher(client, spec.job_id, jsonl=folder / "events.jsonl")
    # The cancel flag is read on the training thread: during an outage that read must fail
    # fast, not stall a step for the usual timeouts.
    flag_client = redis.Redis.from_url(spec.redis_url or "", decode_responses=True, socket_timeout=0.2,
                                       socket_connect_timeout=0.2, **(tls or {}))
    flags = StopFlags(flag_client, spec)
    signal.signal(PREEMPT_SIGNAL, flags.preempt)

    try:
        result = runner.Runner(spec, publisher.emit, flags.check).run()
    except BaseException as e:  # the runner reports method errors itself; this is for its own
        logging.exception("the runner failed")
        result = RunResult(status=JobStatus.FAILED, phase="running the job",
                           error=f"The job process failed outside the method: {type(e).__name__}: {e}")
    # The worker writes the final event; ours must be in the stream before it.
    if not publisher.close(timeout=300):
        logging.warning("some events reached events.jsonl but not Redis")
    write_result(folder, result)
    sys.stdout.flush()
    sys.stderr.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
