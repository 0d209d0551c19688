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

from deepe_tasks.core.ipc import LineReader, Reply, ZygoteReply, write_all

log = logging.getLogger(__name__)

# Spawns the zygote with the two protocol pipes' far ends (cmd read end, reply write end).
SpawnZygote = Callable[[int, int], subprocess.Popen[bytes]]


class HandoverFailed(Exception):
    """Raised when a job process could not be handed its job: the zygote died or did not answer."""


class ZygoteClient:
    """One running zygote, seen from the worker: its pipes and the spare it announced last.

    The client owns two descriptors: the write end of the command pipe and the read end of the
    reply pipe. Each is closed exactly once, and never while another thread reads or writes it
    (a closed number may be reused at once by an unrelated file): ``close`` closes the command
    pipe, and the reply pipe once no job started here still waits for its exit line; the reply
    pipe is also closed at its end of file. Every read and write goes through ``read`` and
    ``send``.
    """

    def __init__(self, spawn: SpawnZygote) -> None:
        cmd_r, cmd_w = os.pipe()
        try:
            reply_r, reply_w = os.pipe()
        except OSError:
            os.close(cmd_r)
            os.close(cmd_w)
            raise
        try:
            self.proc = spawn(cmd_r, reply_w)
        except BaseException:
            os.close(cmd_w)
            os.close(reply_r)
            raise
        finally:
            os.close(cmd_r)
            os.close(reply_w)
        self._cmd_w: int | None = cmd_w
        self._reply_open = True
        self.lines = LineReader(reply_r)
        self._fds = threading.Lock()  # guards the two descriptors and the counts below
        self._reading = 0  # reads under way: the reply pipe stays open meanwhile
        self._writing = 0  # writes under way: the command pipe stays open meanwhile
        self._closed = False
        self.job_running = False  # a job started here has not reported its end yet
        self.spare: tuple[int, float] | None = None
        self.started = time.time()

    def read(self, timeout: float | None) -> str | None:
        """The next reply line; None at the end (then ``lines.eof``) or past ``timeout``."""
        with self._fds:
            if not self._reply_open:
                return self.lines.read(0)  # what is left in its buffer: the reader is at EOF
            self._reading += 1
        try:
            return self.lines.read(timeout)
        finally:
            with self._fds:
                self._reading -= 1
                self._release()

    def send(self, data: bytes) -> None:
        """Write to the zygote's command pipe; OSError once the zygote or this client is gone."""
        with self._fds:
            if self._cmd_w is None:
                raise BrokenPipeError("the zygote client is closed")
            self._writing += 1
        try:
            write_all(self._cmd_w, data)
        finally:
            with self._fds:
                self._writing -= 1
                self._release()

    def job_started(self) -> None:
        """A job is handed over: its exit line will come on the reply pipe, which stays open for it."""
        with self._fds:
            self.job_running = True

    def job_ended(self) -> None:
        """The job started here has ended: the reply pipe may go if the client is closed."""
        with self._fds:
            self.job_running = False
            self._release()

    def handle(self, line: str) -> ZygoteReply | None:
        """Parse a reply; note a spare as it is announced. None for a line that is no reply."""
        try:
            reply = ZygoteReply.parse(line)
        except ValueError:
            log.error("the zygote sent %r, which is not a reply; ignoring it", line)
            return None
        if reply.kind is Reply.SPARE:
            self.spare = (reply.pid, reply.value)
        elif reply.kind is Reply.EXIT and self.spare is not None and self.spare[0] == reply.pid:
            self.spare = None  # the spare died: the zygote announces the next one
        return reply

    def next_spare(self, wait: float) -> tuple[int, float, bool] | None:
        """The waiting spare as (pid, forked_at, was_ready); waits while the zygote imports."""
        while (line := self.read(0)) is not None:  # what was announced meanwhile
            self.handle(line)
        if self.spare is not None:
            return (*self.spare, True)
        deadline = time.monotonic() + wait
        while self.spare is None and not self.lines.eof and time.monotonic() < deadline:
            line = self.read(max(0.0, deadline - time.monotonic()))
            if line is not None:
                self.handle(line)
        return None if self.spare is None else (*self.spare, False)

    def kill(self) -> None:
        """End a zygote that does not answer: its spare and job processes die with it
        (PR_SET_PDEATHSIG), and ``WarmStart`` starts a new one."""
        log.error("the zygote (pid %d) does not answer; killing it, and a new one is started", self.proc.pid)
        self.spare = None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            self.proc.kill()

    def close(self) -> None:
        """Let the zygote go: it reads EOF, ends its spare and exits.

        The reply pipe stays open while a job started here may still read its exit line from
        it; the reader closes it then.
        """
        with self._fds:
            self._closed = True
            self._release()

    def _release(self) -> None:
        """Close what is no longer needed, each once (the caller holds ``_fds``)."""
        if self._closed and self._cmd_w is not None and not self._writing:
            fd, self._cmd_w = self._cmd_w, None
            os.close(fd)  # the zygote reads EOF and exits, which ends a read under way
        if self._reply_open and not self._reading and (self.lines.eof or (self._closed and not self.job_running)):
            self._reply_open = False
            self.lines.eof = True  # from now on it reads only what its buffer holds
            os.close(self.lines.fd)


class ForkedJob:
    """A job process forked by the zygote: the part of ``subprocess.Popen`` the Supervisor uses."""

    forked = True

    def __init__(self, zygote: ZygoteClient, pid: int, started_at: float, warm: bool,
                 start_timeout: float = 60.0) -> None:
        self.zygote = zygote
        self.pid = pid
        self.started_at = started_at
        self.warm = warm
        self.start_timeout = start_timeout
        self.handed = False  # the spec was sent: the process is the job's, not the zygote's spare
        self.returncode: int | None = None
        self.zygote_died = False  # it ended because its zygote died (PDEATHSIG), not by its own doing

    def start(self, spec: str) -> None:
        """Hand the job's spec to the spare; it starts training at once.

        Raises HandoverFailed when the zygote died or did not confirm within ``start_timeout``
        (a zygote that does not answer is killed, so that a new one replaces it).
        """
        self.handed = True
        self.zygote.job_started()
        try:
            self.zygote.send((spec + "\n").encode())
        except OSError as e:
            self._end(-signal.SIGKILL)  # the zygote is gone, and its spare with it
            raise HandoverFailed("the zygote had died before it could start the job") from e
        deadline = time.monotonic() + self.start_timeout
        while self.returncode is None:
            line = self.zygote.read(max(0.0, deadline - time.monotonic()))
            if line is None:
                self._end(-signal.SIGKILL)
                if self.zygote.lines.eof:
                    raise HandoverFailed("the zygote died before it started the job")
                self.zygote.kill()
                raise HandoverFailed(f"the zygote did not start the job within {self.start_timeout:g} s "
                                     "(DEEPE_HANDOVER_TIMEOUT)")
            reply = self.zygote.handle(line)
            if reply is not None and reply.kind is Reply.START:
                self.pid = reply.pid  # the same spare, unless it died just before the hand-over
                self.zygote.spare = None
                return

    def _end(self, code: int) -> int:
        self.returncode = code
        self.zygote.job_ended()
        return code

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            line = self.zygote.read(left)
            if line is None:
                if self.zygote.lines.eof:  # the zygote died: its children got SIGKILL
                    self.zygote_died = True
                    return self._end(-signal.SIGKILL)
                raise subprocess.TimeoutExpired("job process", timeout or 0)
            reply = self.zygote.handle(line)
            if reply is not None and reply.kind is Reply.EXIT and reply.pid == self.pid:
                return self._end(reply.code)
        return self.returncode

    def poll(self) -> int | None:
        try:
            return self.wait(0)
        except subprocess.TimeoutExpired:
            return None

    def discard(self) -> None:
        """Not needed after all: the spare stays with the zygote for the next job."""

    def abandon(self) -> None:
        """The zygote never reported this process's end: kill the zygote (the process dies with
        it) and count the process as killed, so that nobody waits on it for ever."""
        self.zygote.kill()
        if self.returncode is None:
            self._end(-signal.SIGKILL)
