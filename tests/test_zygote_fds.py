"""A worker's zygote client keeps no descriptor of a zygote that died or that it let go.

Each zygote costs the worker two pipe ends (commands out, replies in). A worker whose zygote
dies again and again (a memory limit, an operator's kill) must not pile them up: they are
closed exactly once, when the zygote is gone and no job still waits for its exit line.

The fast tests use the fake zygote of test_ipc (the real `ZygoteServer`, jobs that only exit);
the last one runs the real zygote, which imports the training stack.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from deepe_tasks.worker.warm import WarmStart
from deepe_tasks.worker.zygote_client import ForkedJob
from tests.helpers import wait_for
from tests.test_ipc import Spawner


def open_fds() -> dict[int, str]:
    """This process's descriptors and what each points at."""
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the directory listdir had open
    return fds


def opened_since(baseline: dict[int, str]) -> dict[int, str]:
    """The descriptors open now that were not (or pointed elsewhere) in ``baseline``: a failure's clue."""
    return {fd: target for fd, target in open_fds().items() if baseline.get(fd) != target}


@pytest.fixture(autouse=True)
def quick_restarts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(WarmStart, "CHECK_INTERVAL", 0.05)
    monkeypatch.setattr(WarmStart, "MAX_EARLY_DEATHS", 100)  # killed young on purpose: never give up here


@pytest.fixture
def warm() -> Iterator[tuple[WarmStart, Spawner]]:
    spawner = Spawner()
    starter = WarmStart(spawner)
    yield starter, spawner
    starter.close()
    for proc in spawner.procs:
        proc.wait(timeout=10)


def take(starter: WarmStart, wait: float = 30) -> ForkedJob:
    job = starter.take(wait=wait)
    assert job is not None
    return job


def killed_and_replaced(starter: WarmStart, procs: list, wait: float = 30) -> None:  # type: ignore[type-arg]
    """SIGKILL the newest zygote; return once its successor has a spare waiting."""
    before = len(procs)
    os.kill(procs[-1].pid, signal.SIGKILL)
    procs[-1].wait(timeout=10)
    wait_for(lambda: len(procs) > before, timeout=wait)
    take(starter, wait)


def test_zygotes_that_die_again_and_again_leak_no_descriptor(warm: tuple[WarmStart, Spawner]) -> None:
    starter, spawner = warm
    take(starter)
    baseline = open_fds()
    # When the zygote is killed while it waits with its spare, five times over
    for _ in range(5):
        killed_and_replaced(starter, spawner.procs)
        # Then only the new zygote's two pipe ends are open, where the old one's were
        assert len(open_fds()) == len(baseline), opened_since(baseline)
    # and while a job runs, which dies with it and is reported killed
    job = take(starter)
    job.start('{"block": true}')
    assert job.poll() is None
    killed_and_replaced(starter, spawner.procs)
    assert job.wait(timeout=30) == -signal.SIGKILL
    assert len(open_fds()) == len(baseline), opened_since(baseline)
    # and a job started on the last one still runs to its end
    last = take(starter)
    last.start('{"code": 4}')
    assert last.wait(timeout=30) == 4
    assert len(open_fds()) == len(baseline), opened_since(baseline)


def test_a_closed_client_keeps_the_reply_pipe_until_its_job_reported(warm: tuple[WarmStart, Spawner]) -> None:
    starter, spawner = warm
    job = take(starter)
    before = open_fds()  # with the first zygote's two ends
    # Given a job that ended and was reaped by its zygote, whose exit line the worker has not read
    job.start('{"code": 7}')
    wait_for(lambda: not os.path.exists(f"/proc/{job.pid}"), timeout=30)
    time.sleep(0.2)  # the zygote writes the line right after it reaped the job
    # When the zygote dies and the client lets it go
    os.kill(spawner.procs[-1].pid, signal.SIGKILL)
    wait_for(lambda: len(spawner.procs) == 2, timeout=30)  # the old client was closed before this
    # Then the job's exit code is still read, and the old pipes are closed after it
    assert job.wait(timeout=10) == 7
    take(starter)
    assert len(open_fds()) == len(before), opened_since(before)
    # and letting the last zygote go (no job running) closes both of its ends too
    starter.close()
    for proc in spawner.procs:
        proc.wait(timeout=10)
    assert len(open_fds()) == len(before) - 2, opened_since(before)


def test_letting_the_zygote_go_ends_a_job_waited_on_and_then_closes_its_pipes(
        warm: tuple[WarmStart, Spawner]) -> None:
    starter, spawner = warm
    job = take(starter)
    before = open_fds()
    # Given a running job that another thread waits on, reading the reply pipe
    job.start('{"block": true}')
    codes: list[int] = []
    waiter = threading.Thread(target=lambda: codes.append(job.wait(timeout=30)))
    waiter.start()
    # When the worker lets its zygote go (its shutdown)
    starter.close()
    # Then the zygote ends the job and exits, the waiter learns it, and both ends are closed once
    waiter.join(timeout=30)
    assert codes == [-signal.SIGKILL]
    spawner.procs[-1].wait(timeout=10)
    assert len(open_fds()) == len(before) - 2, opened_since(before)


@pytest.mark.e2e
def test_the_real_zygote_killed_again_and_again_leaks_no_descriptor() -> None:
    from deepe_tasks.worker.processes import spawn_zygote

    procs = []

    def spawn(cmd_fd: int, reply_fd: int):  # type: ignore[no-untyped-def]
        proc = spawn_zygote(cmd_fd, reply_fd)
        procs.append(proc)
        return proc

    before = open_fds()
    starter = WarmStart(spawn)
    try:
        take(starter, wait=180)  # once it has imported the training stack
        running = open_fds()
        assert len(running) == len(before) + 2
        for _ in range(3):
            killed_and_replaced(starter, procs, wait=180)
            assert len(open_fds()) == len(running), opened_since(running)
    finally:
        starter.close()
        for proc in procs:
            proc.wait(timeout=30)
    assert len(open_fds()) == len(before), opened_since(before)
