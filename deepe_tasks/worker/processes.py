"""Job processes: spawned fresh or handed over warm, described when they crash, killed whole."""

from __future__ import annotations

import logging
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery.signals import worker_process_init, worker_process_shutdown

from deepe_tasks.core.ipc import die_with_parent, killed_by
from deepe_tasks.core.settings import get_settings
from deepe_tasks.worker.warm import WarmStart
from deepe_tasks.worker.zygote_client import ForkedJob

log = logging.getLogger(__name__)

TAIL_LINES = 15
JOB_ENV_HIDDEN = frozenset({"DEEPE_REDIS_URL", "DEEPE_API_TOKENS", "REDIS_PASSWORD", "FLOWER_BASIC_AUTH"})
# How long a killed job process may take to be reported gone; past it the worker stops waiting.
KILL_WAIT = 10.0


class ColdJob:
    """A job process started for its job (``--no-warm``): it imports, then reads its spec on stdin."""

    warm = False
    forked = False
    zygote_died = False  # it has none

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.started_at = time.time()
        self.handed = False

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def start(self, spec: str) -> None:
        assert self.proc.stdin is not None
        self.handed = True
        try:
            self.proc.stdin.write((spec + "\n").encode())
            self.proc.stdin.close()
        except BrokenPipeError:
            pass  # it died before reading its job: the Supervisor reports the crash

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)

    def poll(self) -> int | None:
        return self.proc.poll()

    def discard(self) -> None:
        """Not needed after all: end it."""
        self.proc.kill()
        try:
            self.proc.wait(KILL_WAIT)
        except subprocess.TimeoutExpired:
            self.abandon()

    def abandon(self) -> None:
        """A SIGKILLed process that does not go (stuck in the kernel): nothing more can be done."""
        log.error("job process %d did not exit after SIGKILL within %.0f s; leaving it", self.pid, KILL_WAIT)
        self.proc.returncode = -9  # it was sent SIGKILL: report it so, and wait on it no more


JobProcess = ForkedJob | ColdJob


def _job_process_setup(memory_gb: float | None) -> Callable[[], None]:
    def setup() -> None:
        die_with_parent()
        if memory_gb is not None:
            limit = int(memory_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return setup


def tail(path: Path, lines: int = TAIL_LINES, max_bytes: int = 64 * 1024) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - max_bytes))
            text = f.read().decode(errors="replace").rstrip().splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def crash_message(returncode: int, log_path: Path) -> str:
    if returncode < 0:
        why = killed_by(returncode, "a job")
    else:
        why = f"exited with code {returncode} before reporting a result (did the method call os._exit?)"
    last = tail(log_path)
    return f"The job process {why}." + (f" Last output:\n{last}" if last else "")


def _job_env() -> dict[str, str]:
    settings = get_settings()
    # The method is user code: it gets no deployment secrets (its Redis URL comes in the spec).
    env = {k: v for k, v in os.environ.items() if k not in JOB_ENV_HIDDEN}
    if settings.gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = settings.gpus
    return env


def spawn_job_process() -> subprocess.Popen[bytes]:
    """A new job process: it imports the training stack, then reads its spec on stdin."""
    return subprocess.Popen(
        [sys.executable, "-m", "deepe_tasks.job.jobproc"], stdin=subprocess.PIPE, env=_job_env(),
        start_new_session=True,  # its own process group, so a kill takes its DataLoader workers too
        preexec_fn=_job_process_setup(get_settings().job_memory_gb),
    )


def spawn_zygote(cmd_fd: int, reply_fd: int) -> subprocess.Popen[bytes]:
    """The zygote: it imports the training stack once and forks each job process from there."""
    return subprocess.Popen(
        [sys.executable, "-m", "deepe_tasks.job.zygote", str(cmd_fd), str(reply_fd)],
        stdin=subprocess.DEVNULL, pass_fds=(cmd_fd, reply_fd), env=_job_env(), start_new_session=True,
        # Its job processes inherit the memory limit; they die with it, and it with the worker.
        preexec_fn=_job_process_setup(get_settings().job_memory_gb),
    )


_warm: WarmStart | None = None


@worker_process_init.connect
def start_warm(**_: Any) -> WarmStart | None:
    """In each pool process (or lazily, in other pools): keep a zygote running."""
    global _warm
    if _warm is None and get_settings().warm:
        _warm = WarmStart(spawn_zygote)
    return _warm


@worker_process_shutdown.connect
def _close_warm(**_: Any) -> None:
    if _warm is not None:
        _warm.close()


def job_process() -> JobProcess:
    """A process for the next job, waiting for its spec: the zygote's spare, or else a fresh one."""
    warm: WarmStart | None = start_warm()
    forked = warm.take(start_timeout=get_settings().handover_timeout) if warm is not None else None
    if forked is not None:
        return forked
    return ColdJob(spawn_job_process())


def kill_group(proc: JobProcess) -> None:
    """Kill the job process and its process group (DataLoader workers, torchrun children), and
    wait a bounded time for its end. A process never handed its job is given back instead: a
    zygote's spare stays the zygote's (killing it would leave nobody to report its end)."""
    if not proc.handed:
        proc.discard()
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # even after the leader ended: its children may not have
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(KILL_WAIT)
    except subprocess.TimeoutExpired:
        proc.abandon()
