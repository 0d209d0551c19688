"""The zygote: a warm process that forks one fresh job process per job.

It imports the training stack once, never touches CUDA, and keeps one forked *spare* waiting
for a job. A job that arrives is handed to the spare, and the next spare is forked at once,
in milliseconds. Each job still runs in a process of its own, with its own CUDA context, and
nothing of one job reaches the next: jobs never run in the zygote itself.

It talks to its worker over two pipes, one line per message:

    worker → zygote   a job spec (JSON)
    zygote → worker   an `ipc.ZygoteReply`: "spare PID FORKED_AT", "start PID" or "exit PID CODE"

Run as ``python -m deepe_tasks.job.zygote CMD_FD REPLY_FD``; it exits when the worker closes CMD_FD.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import select
import signal
import sys
import time
import traceback
from collections.abc import Callable

from deepe_tasks.core.ipc import (
    LineReader,
    Reply,
    ZygoteReply,
    die_with_parent,
    exit_forked,
    write_all,
)

log = logging.getLogger("deepe_tasks.job.zygote")



class Spare:
    """A forked job process waiting, on its own pipe, for the spec of its job."""

    def __init__(self, pid: int, spec_fd: int, forked_at: float) -> None:
        self.pid = pid
        self.spec_fd = spec_fd
        self.forked_at = forked_at

    def hand(self, line: str) -> None:
        try:
            write_all(self.spec_fd, (line + "\n").encode())
        finally:
            os.close(self.spec_fd)


RunJob = Callable[[str], int]  # a job spec (JSON) in, the job process's exit code out


class ZygoteServer:
    """Serves one worker over its two pipes; ``run_job`` runs a job in a forked process."""

    def __init__(self, cmd_fd: int, reply_fd: int, run_job: RunJob) -> None:
        self.run_job = run_job
        self.cmd_fd = cmd_fd
        self.reply_fd = reply_fd
        self.pid = os.getpid()
        self.wake_r, self.wake_w = os.pipe()
        self.job: int | None = None

    def serve(self) -> int:
        os.set_blocking(self.wake_w, False)
        signal.set_wakeup_fd(self.wake_w)  # SIGCHLD wakes the select below at once
        signal.signal(signal.SIGCHLD, lambda *_: None)
        spare = self.fork()
        commands = LineReader(self.cmd_fd)
        while True:
            ready, _, _ = select.select([self.cmd_fd, self.wake_r], [], [], 1.0)
            if self.wake_r in ready:
                os.read(self.wake_r, 4096)
            spare = self.reap(spare)
            if self.cmd_fd not in ready:
                continue
            while (line := commands.read(0)) is not None:
                spare = self.start(spare, line)
            if commands.eof:
                break  # the worker is gone or done with us
        os.close(spare.spec_fd)  # the spare reads EOF and exits
        if self.job is not None:  # a worker that leaves a job running has crashed: end it too
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.job, signal.SIGKILL)
        return 0

    def start(self, spare: Spare, line: str) -> Spare:
        if self.job is not None:
            log.error("a job arrived while job process %d still runs; refusing it", self.job)
            return spare
        try:
            spare.hand(line)
        except BrokenPipeError:  # the spare died just now: hand the job to a new one
            spare = self.fork()
            spare.hand(line)
        self.job = spare.pid
        self.reply(ZygoteReply(Reply.START, spare.pid))
        return self.fork()  # the next job's process, ready before it is submitted

    def reap(self, spare: Spare) -> Spare:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return spare
            if pid == 0:
                return spare
            code = os.waitstatus_to_exitcode(status)
            if pid == self.job:
                self.job = None
                self.reply(ZygoteReply(Reply.EXIT, pid, code))
            elif pid == spare.pid:
                log.warning("the warm spare (pid %d) died with code %d; replacing it", pid, code)
                os.close(spare.spec_fd)
                # Said, so that whoever holds that spare (a worker about to hand it a job) stops
                # waiting for it; then the next spare is announced.
                self.reply(ZygoteReply(Reply.EXIT, pid, code))
                spare = self.fork()

    def fork(self) -> Spare:
        spec_r, spec_w = os.pipe()
        forked_at = time.time()
        gc.freeze()  # what the zygote made since: left out of the job's collections too (see warm_up)
        pid = os.fork()
        if pid == 0:
            os.close(spec_w)
            self._child(spec_r)  # never returns
        os.close(spec_r)
        self.reply(ZygoteReply(Reply.SPARE, pid, forked_at))
        return Spare(pid, spec_w, forked_at)

    def reply(self, message: ZygoteReply) -> None:
        write_all(self.reply_fd, message.encode())

    def _child(self, spec_fd: int) -> None:
        code = 1
        try:
            # Its own process group, so a kill takes its DataLoader workers and not us; and
            # SIGKILL when the zygote dies, which it does when its worker dies.
            os.setsid()
            die_with_parent()
            if os.getppid() != self.pid:
                os._exit(1)
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            for fd in (self.cmd_fd, self.reply_fd, self.wake_r, self.wake_w):
                os.close(fd)
            _reseed()
            with os.fdopen(spec_fd, "rb") as f:
                line = f.readline()
            code = self.run_job(line.decode()) if line else 0
        except BaseException:
            traceback.print_exc()
        finally:
            exit_forked(code)


def _reseed() -> None:
    """A fresh process draws fresh seeds; forked ones would all share the zygote's."""
    # Python's `random` reseeds itself after a fork; numpy's global generator does not.
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()


def main() -> int:
    cmd_fd, reply_fd = int(sys.argv[1]), int(sys.argv[2])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from deepe_tasks.job import jobproc, preload

    preload.warm_up()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        # A forked CUDA context is unusable: every job would fail. This is a bug in an import.
        log.error("CUDA was initialised while importing the training stack; the zygote cannot fork jobs")
        return 1
    return ZygoteServer(cmd_fd, reply_fd, jobproc.run).serve()


if __name__ == "__main__":
    sys.exit(main())
