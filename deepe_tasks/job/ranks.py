"""The ranks of a multi-device job: the job process is rank 0, and forks the others.

The job process was forked from the zygote (or started cold) and has not touched CUDA, so the
ranks it forks start as warm as it did. Each rank gets the environment that torch.distributed
and the HF Trainer read (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, a free
MASTER_PORT) and runs the same method, so the same trainer trains under DDP: rank r uses device
r of the worker's CUDA_VISIBLE_DEVICES, or a CPU rank with the gloo backend.

Only rank 0 publishes events, reads the cancel flag and saves. The ranks are in rank 0's
process group, so the worker's kill takes them all, and each gets SIGKILL when rank 0 dies.
Rank 0 watches them: a rank that dies while the job trains ends the job at once, naming it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from deepe_tasks.core.ipc import (
    CUTOFF_SIGNAL,
    PREEMPT_SIGNAL,
    die_with_parent,
    exit_forked,
    killed_by,
)
from deepe_tasks.core.records import JobSpec, RunResult

log = logging.getLogger(__name__)

RunRank = Callable[[JobSpec, int], int]  # (spec, rank) in, the rank's exit code out
# How long the ranks may take to exit once rank 0 is done training, before they are killed.
EXIT_GRACE = 30.0
UNKNOWN_EXIT = -1000  # a rank whose exit status could not be read (no signal has this number)


def rank_file(attempt: Path, rank: int) -> Path:
    """Where a rank other than 0 writes how it failed (a RunResult), for rank 0 to report."""
    return attempt / f"rank-{rank}.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def environment(rank: int, world_size: int, port: int) -> dict[str, str]:
    """What torchrun would set for one rank of a single-host job."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size), "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "TORCHELASTIC_RUN_ID": "deepe"}


class Ranks:
    """Ranks 1…N-1 of this job, forked from rank 0 (this process), and their watchers."""

    def __init__(self, spec: JobSpec, attempt: Path, pids: dict[int, int]) -> None:
        self.spec = spec
        self.attempt = attempt
        self.pids = pids
        self.codes: dict[int, int] = {}
        self.done = threading.Event()  # rank 0 decided how the attempt ends: rank exits are no failure
        self.failed = threading.Event()
        self._exited = threading.Condition()

    @classmethod
    def start(cls, spec: JobSpec, attempt: Path, run_rank: RunRank) -> Ranks:
        """Fork ranks 1…N-1 and set this process up as rank 0. Call before any thread starts."""
        port = free_port()
        parent = os.getpid()
        pids = {}
        for rank in range(1, spec.world_size):
            pid = os.fork()
            if pid == 0:
                _child(spec, rank, port, parent, run_rank)  # never returns
            pids[rank] = pid
        os.environ.update(environment(0, spec.world_size, port))
        return cls(spec, attempt, pids)

    def watch(self, on_failure: Callable[[str], None]) -> None:
        """Call ``on_failure`` with a message as soon as a rank dies while the job trains."""
        for rank, pid in self.pids.items():
            threading.Thread(target=self._wait, args=(rank, pid, on_failure), daemon=True,
                             name=f"deepe-rank-{rank}").start()

    def _wait(self, rank: int, pid: int, on_failure: Callable[[str], None]) -> None:
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                code = os.waitstatus_to_exitcode(status)
                break
            except InterruptedError:
                continue
            except ChildProcessError:  # reaped elsewhere: its status is unknown
                code = UNKNOWN_EXIT
                break
        with self._exited:
            self.codes[rank] = code
            self._exited.notify_all()
        if code != 0 and not self.done.is_set():
            self.failed.set()
            on_failure(self.describe(rank, code))

    def describe(self, rank: int, code: int) -> str:
        """The job's error when rank ``rank`` ended with ``code`` while the job trained."""
        n = self.spec.world_size
        if code == UNKNOWN_EXIT:
            why = "ended with an exit status that could not be read"
        elif code < 0:
            why = killed_by(code, "a rank")
        else:
            why = f"exited with code {code}"
        own = ""
        with contextlib.suppress(OSError, ValueError):
            failure = RunResult.model_validate_json(rank_file(self.attempt, rank).read_text())
            own = f" Its error: {failure.error}" if failure.error else ""
        return (f"Rank {rank} of {n} {why}, so every rank of the job was stopped.{own} "
                f"Each rank's output is in the job's output.log.")

    def stop(self, timeout: float) -> None:
        """Rank 0 is done: wait up to ``timeout`` for the ranks to exit, then kill the rest."""
        self.done.set()
        deadline = time.monotonic() + timeout
        with self._exited:
            while len(self.codes) < len(self.pids) and time.monotonic() < deadline:
                self._exited.wait(max(0.0, deadline - time.monotonic()))
        for rank, pid in self.pids.items():
            if rank not in self.codes:
                log.warning("rank %d did not exit within %.0f s of the job's end; killing it", rank, timeout)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _child(spec: JobSpec, rank: int, port: int, parent: int, run_rank: RunRank) -> None:
    code = 1
    try:
        die_with_parent()  # rank 0 gone (killed, crashed, done): this rank goes too
        if os.getppid() != parent:
            os._exit(1)
        # Stop decisions reach rank 0 only, which shares them with every rank at a step boundary.
        signal.signal(PREEMPT_SIGNAL, signal.SIG_IGN)
        signal.signal(CUTOFF_SIGNAL, signal.SIG_IGN)
        os.environ.update(environment(rank, spec.world_size, port))
        code = run_rank(spec, rank)
    except BaseException:
        traceback.print_exc()
    finally:
        exit_forked(code)
