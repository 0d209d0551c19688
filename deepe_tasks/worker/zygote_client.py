"""The worker's side of warm start: it keeps a zygote running and takes job processes from it.

The zygote (`zygote.py`) imports the training stack once and forks a spare job process ahead
of each job, so a job starts in milliseconds. This side restarts the zygote when it dies,
and wraps a forked job process in a handle the Supervisor can wait on and kill.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable

from deepe_tasks.job.ipc import LineReader, Reply, ZygoteReply, write_all

log = logging.getLogger(__name__)

# Spawns the zygote with the two protocol pipes' far ends (cmd read end, reply write end).
SpawnZygote = Callable[[int, int], subprocess.Popen[bytes]]


class ZygoteClient:
    """One running zygote, seen from the worker: its pipes and the spare it announced last."""

    def __init__(self, spawn: SpawnZygote) -> None:
        cmd_r, self.cmd_w = os.pipe()
        reply_r, reply_w = os.pipe()
        try:
            self.proc = spawn(cmd_r, reply_w)
        finally:
            os.close(cmd_r)
            os.close(reply_w)
        self.lines = LineReader(reply_r)
        self.spare: tuple[int, float] | None = None
        self.started = time.time()

    def handle(self, line: str) -> ZygoteReply | None:
        """Parse a reply; note a spare as it is announced. None for a line that is no reply."""
        try:
            reply = ZygoteReply.parse(line)
        except ValueError:
            log.error("the zygote sent %r, which is not a reply; ignoring it", line)
            return None
        if reply.kind is Reply.SPARE:
            self.spare = (reply.pid, reply.value)
        return reply

    def next_spare(self, wait: float) -> tuple[int, float, bool] | None:
        """The waiting spare as (pid, forked_at, was_ready); waits while the zygote imports."""
        while (line := self.lines.read(0)) is not None:  # what was announced meanwhile
            self.handle(line)
        if self.spare is not None:
            return (*self.spare, True)
        deadline = time.monotonic() + wait
        while self.spare is None and not self.lines.eof and time.monotonic() < deadline:
            line = self.lines.read(max(0.0, deadline - time.monotonic()))
            if line is not None:
                self.handle(line)
        return None if self.spare is None else (*self.spare, False)

    def close(self) -> None:
        """Let the zygote go: it reads EOF, ends its spare and exits.

        The reply pipe stays open: a job may still be reading from it.
        """
        try:
            os.close(self.cmd_w)
        except OSError:
            pass


class ForkedJob:
    """A job process forked by the zygote: the part of ``subprocess.Popen`` the Supervisor uses."""

    START_TIMEOUT = 60.0
    forked = True

    def __init__(self, zygote: ZygoteClient, pid: int, started_at: float, warm: bool) -> None:
        self.zygote = zygote
        self.pid = pid
        self.started_at = started_at
        self.warm = warm
        self.returncode: int | None = None

    def start(self, spec: str) -> None:
        """Hand the job's spec to the spare; it starts training at once."""
        try:
            write_all(self.zygote.cmd_w, (spec + "\n").encode())
        except OSError:
            self.returncode = -signal.SIGKILL  # the zygote is gone, and its spare with it
            return
        while self.returncode is None:
            line = self.zygote.lines.read(self.START_TIMEOUT)
            if line is None:  # the zygote died, or does not answer
                log.error("the zygote did not start job process %d; treating it as killed", self.pid)
                self.returncode = -signal.SIGKILL
                return
            reply = self.zygote.handle(line)
            if reply is not None and reply.kind is Reply.START:
                self.pid = reply.pid  # the same spare, unless it died just before the hand-over
                self.zygote.spare = None
                return

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            line = self.zygote.lines.read(left)
            if line is None:
                if self.zygote.lines.eof:  # the zygote died: its children got SIGKILL
                    self.returncode = -signal.SIGKILL
                    break
                raise subprocess.TimeoutExpired("job process", timeout or 0)
            reply = self.zygote.handle(line)
            if reply is not None and reply.kind is Reply.EXIT and reply.pid == self.pid:
                self.returncode = reply.code
        return self.returncode

    def poll(self) -> int | None:
        try:
            return self.wait(0)
        except subprocess.TimeoutExpired:
            return None

    def discard(self) -> None:
        """Not needed after all: the spare stays with the zygote for the next job."""


class ColdJob:
    """A job process started for its job (``--no-warm``): it imports, then reads its spec on stdin."""

    warm = False
    forked = False

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.started_at = time.time()

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def start(self, spec: str) -> None:
        assert self.proc.stdin is not None
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
        self.proc.wait()


JobProcess = ForkedJob | ColdJob


class WarmStart:
    """Keeps a zygote running for this worker process; restarts it when it dies.

    A zygote that keeps dying young (a broken import, CUDA touched at import, a memory limit
    too small for the stack) is given up after MAX_EARLY_DEATHS: jobs then start cold.
    """

    CHECK_INTERVAL = 1.0
    EARLY = 60.0  # seconds: a zygote that dies sooner died young
    MAX_EARLY_DEATHS = 3

    def __init__(self, spawn: SpawnZygote) -> None:
        self._spawn = spawn
        self._zygote: ZygoteClient | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._early_deaths = 0
        # The zygote is spawned from this long-lived thread: PR_SET_PDEATHSIG fires when the
        # spawning *thread* ends, and this one ends only with the worker.
        self._thread = threading.Thread(target=self._run, name="deepe-zygote", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed:
            with self._lock:
                z = self._zygote
                if z is not None and z.proc.poll() is not None:
                    z.close()
                    self._zygote = None
                    young = time.time() - z.started < self.EARLY
                    self._early_deaths = self._early_deaths + 1 if young else 0
                    if self._early_deaths >= self.MAX_EARLY_DEATHS:
                        log.error("the zygote died %d times within %.0f s of its start (see its errors above); "
                                  "job processes start cold from now on", self._early_deaths, self.EARLY)
                        self._closed = True
                        return
                    log.warning("the zygote (pid %d) died with code %s; restarting it", z.proc.pid, z.proc.returncode)
                if self._zygote is None and not self._closed:
                    try:
                        self._zygote = ZygoteClient(self._spawn)
                    except Exception as e:  # never let this thread die
                        log.warning("could not start the zygote: %s", e)
            self._wake.wait(self.CHECK_INTERVAL)
            self._wake.clear()

    def take(self, wait: float = 600.0) -> ForkedJob | None:
        """The zygote's spare, waiting for its spec; None if the zygote cannot give one.

        Nothing is used up until ``ForkedJob.start``: a job that is dropped leaves the spare.
        """
        deadline = time.monotonic() + 30
        while self._zygote is None and not self._closed and time.monotonic() < deadline:
            time.sleep(0.05)  # the zygote is being (re)started
        with self._lock:
            z = self._zygote
        if z is None:
            return None
        spare = z.next_spare(wait)
        if spare is None:
            return None
        pid, forked_at, ready = spare
        return ForkedJob(z, pid, forked_at, warm=ready)

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        with self._lock:
            z, self._zygote = self._zygote, None
        if z is not None:
            z.close()
