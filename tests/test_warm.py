"""The warm spare: used when there, replaced when it dies, absent with --no-warm."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from deepe_tasks import EventKind, JobStatus, submit
from tests.helpers import Worker, wait_for, write_method

pytestmark = pytest.mark.e2e


def _process_table() -> tuple[dict[int, int], dict[int, str]]:
    parents: dict[int, int] = {}
    cmdlines: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdlines[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z":
            parents[int(entry.name)] = int(fields[1])
    return parents, cmdlines


def zygotes_of(worker: Worker) -> list[int]:
    """The pids of the zygotes under a worker (children of its pool processes)."""
    root = worker.process.proc.pid  # type: ignore[union-attr]
    parents, cmdlines = _process_table()
    pool = {pid for pid, ppid in parents.items() if ppid == root}
    return sorted(pid for pid, ppid in parents.items()
                  if (ppid in pool or ppid == root) and "deepe_tasks.job.zygote" in cmdlines.get(pid, ""))


def job_processes_of(worker: Worker) -> list[int]:
    """The pids of the job processes under a worker: started for a job, or forked by a zygote."""
    root = worker.process.proc.pid  # type: ignore[union-attr]
    parents, cmdlines = _process_table()
    pool = {pid for pid, ppid in parents.items() if ppid == root} | {root}
    zygotes = set(zygotes_of(worker))
    return sorted(pid for pid, ppid in parents.items()
                  if ppid in zygotes or (ppid in pool and "deepe_tasks.job.jobproc" in cmdlines.get(pid, "")))


def started_event(job: Any) -> Any:
    return next(e for e in job.events() if e.kind is EventKind.STARTED)


def test_a_job_is_handed_to_the_spare_that_was_started_before_it_was_submitted(
        workers: list[Worker], tmp_path: Path, sft_params: dict[str, Any]) -> None:
    w = Worker("warm-q", tmp_path / "worker.log").start()
    workers.append(w)
    spare = wait_for(lambda: job_processes_of(w), timeout=60)[0]  # forked, so its fork time is past
    submitted = time.time()
    job = submit("sft-demo", sft_params, queue="warm-q")
    assert job.wait(timeout=120) is JobStatus.SUCCEEDED
    started = started_event(job)
    assert started.metrics["warm"] is True and started.metrics["forked"] is True
    assert started.metrics["pid"] == spare
    assert started.metrics["process_started_at"] < submitted
    # A new spare, forked from the same zygote, waits for the next job
    assert wait_for(lambda: [p for p in job_processes_of(w) if p != spare], timeout=60)
    assert len(zygotes_of(w)) == 1


def test_a_killed_spare_is_replaced(workers: list[Worker], tmp_path: Path, sft_params: dict[str, Any]) -> None:
    w = Worker("warm-kill-q", tmp_path / "worker.log").start()
    workers.append(w)
    first = wait_for(lambda: job_processes_of(w), timeout=60)[0]
    os.kill(first, signal.SIGKILL)
    replacement = wait_for(lambda: [p for p in job_processes_of(w) if p != first], timeout=30)[0]
    job = submit("sft-demo", sft_params, queue="warm-kill-q")
    assert job.wait(timeout=120) is JobStatus.SUCCEEDED
    assert started_event(job).metrics["pid"] == replacement
    assert "warm spare" in w.log() and "died" in w.log()


def test_a_killed_zygote_is_restarted_and_takes_its_spare_with_it(
        workers: list[Worker], tmp_path: Path, sft_params: dict[str, Any]) -> None:
    # Given a warm worker
    w = Worker("zygote-kill-q", tmp_path / "worker.log").start()
    workers.append(w)
    spare = wait_for(lambda: job_processes_of(w), timeout=60)[0]
    zygote = zygotes_of(w)[0]
    # When its zygote is killed
    killed_at = time.time()
    os.kill(zygote, signal.SIGKILL)
    # Then its spare dies with it, a new zygote starts, and jobs run on a spare of the new one
    wait_for(lambda: not Path(f"/proc/{spare}").exists() or None, timeout=10)
    new = wait_for(lambda: [z for z in zygotes_of(w) if z != zygote], timeout=30)[0]
    job = submit("sft-demo", sft_params, queue="zygote-kill-q")
    assert job.wait(timeout=120) is JobStatus.SUCCEEDED
    started = started_event(job)
    assert started.metrics["pid"] == job.info()["pid"] != spare
    assert started.metrics["process_started_at"] > killed_at  # forked by the new zygote
    assert zygotes_of(w) == [new]
    assert "zygote" in w.log() and "restarting it" in w.log()


def test_a_zygote_killed_while_its_job_trains_requeues_the_job_which_resumes(
        workers: list[Worker], tmp_path: Path, store: Path, sft_params: dict[str, Any]) -> None:
    from tests.helpers import SLOW_METHOD

    slow = write_method(store, "zygote_slow", SLOW_METHOD)
    # Given a warm worker training a job forked by its zygote
    w = Worker("zygote-job-q", tmp_path / "worker.log", env={"DEEPE_CHECKPOINT_MINUTES": "0.001"}).start()
    workers.append(w)
    job = submit(slow, {**sft_params, "MAX_STEPS": 12, "step_sleep": 0.3, "PromptInputColumn": "instruction",
                        "PromptOutputColumn": "output"}, queue="zygote-job-q")
    wait_for(lambda: any(e.kind is EventKind.LOG for e in job.events()) or job.status().is_final, timeout=120)
    assert job.status() is JobStatus.RUNNING, job.info().get("error")
    # When the zygote is killed (its job process dies with it: PR_SET_PDEATHSIG)
    os.kill(zygotes_of(w)[0], signal.SIGKILL)
    # Then the job is not failed for it: it is requeued as a loss and resumes to the end
    assert job.wait(timeout=240) is JobStatus.SUCCEEDED, (job.info().get("error"), w.log()[-3000:])
    info = job.info()
    assert info["attempts"] == 2 and info["losses"] == 1
    assert any(e.kind is EventKind.REQUEUED and "zygote died" in (e.message or "") for e in job.events())


def test_no_warm_runs_each_job_in_a_process_started_for_it(workers: list[Worker], tmp_path: Path,
                                                           sft_params: dict[str, Any]) -> None:
    w = Worker("cold-q", tmp_path / "worker.log", extra_args=["--no-warm"]).start()
    workers.append(w)
    submitted = time.time()
    job = submit("sft-demo", sft_params, queue="cold-q")
    assert job.wait(timeout=120) is JobStatus.SUCCEEDED
    started = started_event(job)
    assert started.metrics["warm"] is False and started.metrics["forked"] is False
    assert started.metrics["process_started_at"] >= submitted
    # A whole job later, long after a pool process would have started one, there is no zygote
    assert job_processes_of(w) == [] and zygotes_of(w) == []


DRAW_METHOD = '''
import gc, os, random, sys

import numpy as np
import torch

# The job folder is the working directory: leave what a fresh process draws there, and what it
# found made already (trainers the method has not imported; objects the gc will not walk).
with open("draws.txt", "w") as f:
    f.write(f"{os.getpid()} {random.random()} {np.random.random()} {torch.cuda.is_initialized()} "
            f"{'trl.trainer.grpo_trainer' in sys.modules} {gc.get_freeze_count()}")
raise SystemExit("drawn")
'''


def test_forked_job_processes_draw_fresh_random_numbers(worker: Worker, store: Path, storage: Path,
                                                        sft_params: dict[str, Any]) -> None:
    # Given two jobs of a method that records what a fresh process draws
    write_method(store, "draws", DRAW_METHOD)
    # When both run, one after the other, in processes forked from the same warm zygote
    draws = []
    for _ in range(2):
        job = submit("draws", sft_params, check=False)
        assert job.wait(timeout=120) is JobStatus.FAILED
        assert started_event(job).metrics["forked"] is True
        draws.append((storage / "jobs" / job.id / "draws.txt").read_text().split())
    # Then they are two processes that share no random state and no CUDA context
    (pid_a, py_a, np_a, cuda_a, *warm_a), (pid_b, py_b, np_b, cuda_b, *warm_b) = draws
    assert pid_a != pid_b and py_a != py_b and np_a != np_b
    assert cuda_a == cuda_b == "False"
    # And both found the trainers imported and the stack's objects out of the gc's walks (preload.py)
    for grpo_imported, frozen in (warm_a, warm_b):
        assert grpo_imported == "True" and int(frozen) > 100_000, (grpo_imported, frozen)


def test_a_zygote_that_keeps_dying_young_is_given_up_and_jobs_start_cold(caplog: pytest.LogCaptureFixture) -> None:
    # Given a zygote that dies at once, as one whose imports fail would
    import subprocess
    import sys

    from deepe_tasks.worker.warm import WarmStart

    def spawn(cmd_fd: int, reply_fd: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"], pass_fds=(cmd_fd, reply_fd))

    # When the worker side keeps it running
    with caplog.at_level("WARNING", logger="deepe_tasks.worker.zygote_client"):
        warm = WarmStart(spawn)
        try:
            # Then it is restarted, given up after a few early deaths, and no spare is offered
            wait_for(lambda: "start cold from now on" in caplog.text, timeout=30)
            assert warm.take(wait=1) is None
        finally:
            warm.close()
    assert caplog.text.count("restarting it") == WarmStart.MAX_EARLY_DEATHS - 1


def test_a_method_larger_than_a_pipe_buffer_reaches_its_forked_process(worker: Worker, store: Path, storage: Path,
                                                                       sft_params: dict[str, Any]) -> None:
    # Given a method whose source is over 256 KiB, four times a pipe's buffer
    source = DRAW_METHOD + "".join(f"# filler line {i:06d} " + "x" * 40 + "\n" for i in range(5000))
    assert len(source) > 4 * 65536
    write_method(store, "big", source)
    # When it runs in a forked job process
    job = submit("big", sft_params, check=False)
    assert job.wait(timeout=120) is JobStatus.FAILED
    # Then the whole source arrived and ran
    assert started_event(job).metrics["forked"] is True
    assert (storage / "jobs" / job.id / "draws.txt").exists()
    assert "drawn" in job.info()["error"]


ATEXIT_METHOD = '''
import atexit

# A method's exit hooks run when its process ends, as in a process started for it.
atexit.register(lambda: open("atexit.txt", "w").write("ran"))
raise SystemExit("done")
'''


def test_a_forked_job_process_runs_the_methods_exit_hooks(worker: Worker, store: Path, storage: Path,
                                                          sft_params: dict[str, Any]) -> None:
    # Given a method that registers an exit hook
    write_method(store, "hooks", ATEXIT_METHOD)
    # When it runs in a forked job process and its process ends
    job = submit("hooks", sft_params, check=False)
    assert job.wait(timeout=120) is JobStatus.FAILED
    assert started_event(job).metrics["forked"] is True
    # Then the hook ran
    assert (storage / "jobs" / job.id / "atexit.txt").read_text() == "ran"
