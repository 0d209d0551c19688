"""The pipe protocol between a worker and its zygote, with real processes and real pipes.

The zygote here is the real `ZygoteServer` in its own process; only what a forked job runs is
replaced (a job spec names the exit code it ends with), so no training stack is imported.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from deepe_tasks.core.ipc import LineReader, Reply, ZygoteReply, write_all
from deepe_tasks.worker.warm import WarmStart
from deepe_tasks.worker.zygote_client import ForkedJob
from tests.helpers import wait_for

# A job spec is {"code": N} (exit with N), {"kill": true} (die by SIGKILL) or {"block": true}.
FAKE_ZYGOTE = """
import json, os, signal, sys, time
from deepe_tasks.job.zygote import ZygoteServer

def run_job(line):
    spec = json.loads(line)
    if spec.get("kill"):
        os.kill(os.getpid(), signal.SIGKILL)
    while spec.get("block"):
        time.sleep(0.05)
    return int(spec["code"])

sys.exit(ZygoteServer(int(sys.argv[1]), int(sys.argv[2]), run_job).serve())
"""


class Spawner:
    """Spawns the fake zygote the way the worker spawns the real one; remembers each."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def __call__(self, cmd_fd: int, reply_fd: int) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-c", FAKE_ZYGOTE, str(cmd_fd), str(reply_fd)],
                                pass_fds=(cmd_fd, reply_fd), start_new_session=True)
        self.procs.append(proc)
        return proc


@pytest.fixture
def warm() -> Iterator[tuple[WarmStart, Spawner]]:
    spawner = Spawner()
    warm = WarmStart(spawner)
    yield warm, spawner
    warm.close()
    for proc in spawner.procs:
        proc.wait(timeout=10)  # each zygote exits once its worker lets it go


def take(warm: WarmStart) -> ForkedJob:
    job = warm.take(wait=30)
    assert job is not None
    return job


@pytest.mark.parametrize("reply", [ZygoteReply(Reply.SPARE, 123, 1764355200.123456),
                                   ZygoteReply(Reply.START, 123), ZygoteReply(Reply.EXIT, 123, -9)])
def test_each_reply_reads_back_as_it_was_written(reply: ZygoteReply) -> None:
    line = reply.encode().decode()
    assert line.endswith("\n") and line.count("\n") == 1
    assert ZygoteReply.parse(line.strip()) == reply


@pytest.mark.parametrize("line", ["", "spare", "spare 12", "start x", "exit 12", "exit 12 3 4", "hello 1 2"])
def test_a_line_that_is_no_reply_is_refused(line: str) -> None:
    with pytest.raises(ValueError):
        ZygoteReply.parse(line)


def test_line_reader_joins_partial_writes_times_out_and_sees_eof() -> None:
    r, w = os.pipe()
    reader = LineReader(r)
    assert reader.read(0.05) is None and not reader.eof  # nothing yet: a timeout, not the end
    os.write(w, b"spare 1 ")
    assert reader.read(0.05) is None
    os.write(w, b"2.5\nstart 1\nexit")
    assert reader.read(1) == "spare 1 2.5"
    assert reader.read(1) == "start 1"
    os.close(w)
    assert reader.read(1) is None and reader.eof
    os.close(r)


def test_write_all_sends_more_than_a_pipe_holds() -> None:
    r, w = os.pipe()
    data = b"x" * (1 << 20) + b"\n"  # a spec with a long method source: 16 times a pipe's buffer
    got = bytearray()
    reader = threading.Thread(target=lambda: got.extend(_drain(r)))
    reader.start()
    write_all(w, data)
    os.close(w)
    reader.join(10)
    os.close(r)
    assert bytes(got) == data


def _drain(fd: int) -> bytes:
    out = b""
    while chunk := os.read(fd, 1 << 16):
        out += chunk
    return out


def test_jobs_start_in_the_waiting_spare_and_report_their_exit_code(warm: tuple[WarmStart, Spawner]) -> None:
    starter, _ = warm
    first = take(starter)
    first.start('{"code": 3}')
    assert first.wait(timeout=30) == 3
    second = take(starter)  # the next spare, forked while the first job ran
    assert second.pid != first.pid and second.warm
    second.start('{"code": 0}')
    assert second.wait(timeout=30) == 0


def test_a_job_killed_by_a_signal_reports_minus_the_signal(warm: tuple[WarmStart, Spawner]) -> None:
    starter, _ = warm
    job = take(starter)
    job.start('{"kill": true}')
    assert job.wait(timeout=30) == -signal.SIGKILL


def test_poll_does_not_wait_and_a_dead_zygote_ends_its_job_and_is_replaced(
        warm: tuple[WarmStart, Spawner]) -> None:
    starter, spawner = warm
    job = take(starter)
    job.start('{"block": true}')
    assert job.poll() is None  # still running
    # When the zygote dies, its job process dies with it (PR_SET_PDEATHSIG)
    os.kill(spawner.procs[0].pid, signal.SIGKILL)
    assert job.wait(timeout=30) == -signal.SIGKILL
    # and the worker starts another zygote, whose spare takes the next job
    wait_for(lambda: len(spawner.procs) == 2, timeout=30)
    again = take(starter)
    again.start('{"code": 5}')
    assert again.wait(timeout=30) == 5
