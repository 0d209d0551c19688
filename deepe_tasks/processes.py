"""Job processes: spawned fresh or handed over warm, described when they crash, killed whole."""

from __future__ import annotations

import ctypes
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

from .settings import get_settings
from .warm import WarmSpare

log = logging.getLogger(__name__)

TAIL_LINES = 15
JOB_ENV_HIDDEN = frozenset({"DEEPE_REDIS_URL", "DEEPE_API_TOKENS", "REDIS_PASSWORD", "FLOWER_BASIC_AUTH"})
PR_SET_PDEATHSIG = 1


try:
    # Loaded here, not between fork and exec, where a multi-threaded parent must not dlopen.
    _LIBC: ctypes.CDLL | None = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:
    _LIBC = None


def _job_process_setup(memory_gb: float | None) -> Callable[[], None]:
    def setup() -> None:
        # Get SIGKILL when the worker dies, so no orphan trains on beside a resumed attempt.
        if _LIBC is not None:
            _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
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
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        why = f"was killed by {name}"
        if name == "SIGKILL":
            why += " (the kernel's out-of-memory killer does this when a job uses too much memory)"
        elif name == "SIGSEGV":
            why += " (a crash in native code, such as a CUDA or tokenizer library)"
    else:
        why = f"exited with code {returncode} before reporting a result (did the method call os._exit?)"
    last = tail(log_path)
    return f"The job process {why}." + (f" Last output:\n{last}" if last else "")


def spawn_job_process() -> subprocess.Popen[str]:
    """A new job process: it imports the training stack, then waits for its spec on stdin."""
    settings = get_settings()
    # The method is user code: it gets no deployment secrets (its Redis URL comes in the spec).
    env = {k: v for k, v in os.environ.items() if k not in JOB_ENV_HIDDEN}
    if settings.gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = settings.gpus
    return subprocess.Popen(
        [sys.executable, "-m", "deepe_tasks.jobproc"],
        stdin=subprocess.PIPE, text=True, env=env,
        start_new_session=True,  # its own process group, so a kill takes its DataLoader workers too
        preexec_fn=_job_process_setup(settings.job_memory_gb),
    )


_spare: WarmSpare | None = None


@worker_process_init.connect
def start_warm_spare(**_: Any) -> WarmSpare | None:
    """In each pool process (or lazily, in other pools): keep a job process warm."""
    global _spare
    if _spare is None and get_settings().warm:
        _spare = WarmSpare(spawn_job_process)
    return _spare


@worker_process_shutdown.connect
def _close_warm_spare(**_: Any) -> None:
    if _spare is not None:
        _spare.close()


def job_process() -> tuple[subprocess.Popen[str], float, bool]:
    """The warm spare if there is one, else a fresh process: (process, its start time, warm)."""
    spare = start_warm_spare()
    taken = spare.take() if spare is not None else None
    if taken is not None:
        return taken[0], taken[1], True
    return spawn_job_process(), time.time(), False


def kill_group(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
