"""What a worker and its job processes agree on, without importing each other."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import select
import signal
import sys
import time
from dataclasses import dataclass
from enum import Enum
from typing import NoReturn

RESULT_FILE = "result.json"  # in the attempt's folder: how the attempt ended (a RunResult)
LOG_FILE = "output.log"  # in the job folder: the job process's stdout and stderr
# The worker sends this to a job process that should checkpoint and stop, to be resumed.
PREEMPT_SIGNAL = signal.SIGUSR1
# ... and this one when it could not renew the job's lease for a whole TTL: the job checkpoints
# and stops, so that it never trains beside the attempt that replaces it.
CUTOFF_SIGNAL = signal.SIGUSR2
# The exit code of a job process that found itself replaced by another attempt.
FENCED_EXIT = 75

PR_SET_PDEATHSIG = 1
try:
    # Loaded at import, not between fork and exec, where a multi-threaded parent must not dlopen.
    _LIBC: ctypes.CDLL | None = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:
    _LIBC = None


def die_with_parent() -> None:
    """Get SIGKILL when the parent (thread) dies, so no orphan trains on beside a resumed attempt."""
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def killed_by(code: int, what: str) -> str:
    """How a process that ended with ``-code`` (a signal) died, for a message about ``what``."""
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    why = f"was killed by {name}"
    if name == "SIGKILL":
        why += f" (the kernel's out-of-memory killer does this when {what} uses too much memory)"
    elif name == "SIGSEGV":
        why += " (a crash in native code, such as a CUDA or tokenizer library)"
    return why


def exit_forked(code: int) -> NoReturn:
    """End a forked child as a fresh process would (its atexit hooks, flushed output), never
    unwinding into the frames of the process it was forked from."""
    with contextlib.suppress(BaseException):
        atexit._run_exitfuncs()
    with contextlib.suppress(BaseException):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data``: a spec with a long method source can outgrow a pipe's buffer."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class LineReader:
    """Lines from a pipe, read without waiting past a timeout."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = b""
        self.eof = False

    def read(self, timeout: float | None) -> str | None:
        """The next line; None at EOF, or if none came within ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buffer:
            if self.eof:
                return None
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.fd], [], [], left)[0]:
                return None
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                self.eof = True
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()


class Reply(str, Enum):
    """What the zygote tells its worker, one line each (the worker sends job specs as JSON lines)."""

    SPARE = "spare"  # "spare PID FORKED_AT": a forked job process waits for a job
    START = "start"  # "start PID": that process took the job just handed over
    EXIT = "exit"  # "exit PID CODE": the job process ended (CODE < 0: killed by signal -CODE)


@dataclass(frozen=True)
class ZygoteReply:
    kind: Reply
    pid: int
    value: float = 0.0  # SPARE: when it was forked (epoch seconds); EXIT: the exit code

    def encode(self) -> bytes:
        if self.kind is Reply.START:
            return f"start {self.pid}\n".encode()
        value = repr(self.value) if self.kind is Reply.SPARE else str(int(self.value))
        return f"{self.kind.value} {self.pid} {value}\n".encode()

    @classmethod
    def parse(cls, line: str) -> ZygoteReply:
        """The reply in ``line``; ValueError for a line that is not one."""
        kind, pid, *rest = line.split()
        reply = Reply(kind)
        if len(rest) != (0 if reply is Reply.START else 1):
            raise ValueError(f"malformed zygote reply {line!r}")
        return cls(reply, int(pid), float(rest[0]) if rest else 0.0)

    @property
    def code(self) -> int:
        return int(self.value)
