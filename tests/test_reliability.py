"""Fault injection with real processes: kills, preemption, cancels, time limits, Redis restarts.

Each test reads the outcome from the job record and its events, not from logs.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from deepe_tasks import EventKind, Job, JobStatus, submit
from tests.helpers import SLOW_METHOD, SLOW_SAVE, Worker, process_gone, wait_for, write_method

pytestmark = pytest.mark.e2e

# Short leases and frequent checkpoints, so that faults are noticed in seconds.
FAST = {"DEEPE_LEASE_TTL": "3", "DEEPE_CHECKPOINT_MINUTES": "0.02", "DEEPE_CANCEL_GRACE": "5"}


@pytest.fixture(scope="module", autouse=True)
def slow_method(store: Path) -> str:
    return write_method(store, "slow", SLOW_METHOD)


@pytest.fixture
def slow_params(sft_params: dict[str, object]) -> dict[str, object]:
    return {**sft_params, "MAX_STEPS": 24, "PromptInputColumn": "instruction", "PromptOutputColumn": "output"}


def start_worker(workers: list[Worker], queue: str, tmp_path: Path, **env: str) -> Worker:
    w = Worker(queue, tmp_path / f"worker-{len(workers)}.log", env={**FAST, **env}).start()
    workers.append(w)
    return w


def kinds(job: Job) -> list[EventKind]:
    return [e.kind for e in job.events()]


def wait_for_event(job: Job, kind: EventKind, count: int = 1, timeout: float = 120) -> None:
    wait_for(lambda: kinds(job).count(kind) >= count or job.status().is_final, timeout=timeout)
    assert kinds(job).count(kind) >= count, f"no {kind.value} event; events: {kinds(job)}; {job.info()}"


def log_steps(job: Job) -> list[int]:
    return [e.step or 0 for e in job.events() if e.kind is EventKind.LOG and "loss" in e.metrics]


def assert_one_final_model(job: Job) -> None:
    out = Path(job.info()["output_dir"])
    assert json.loads((out / "deepe.json").read_text())["job"] == job.id
    assert not [p for p in out.parent.iterdir() if job.id in p.name and p != out]


def kill_worker_running(job: Job, worker: Worker) -> int:
    """SIGKILL a whole worker (main process and pool) while it runs ``job``; return the job's pid."""
    pid = job.info()["pid"]
    assert worker.alive() and pid
    worker.process.signal(signal.SIGKILL, group=True)
    worker.process.proc.wait()  # type: ignore[union-attr]
    # The job process runs in its own session; it must die with its worker all the same.
    wait_for(lambda: process_gone(pid), timeout=10)
    return int(pid)


def test_sigkill_of_the_worker_resumes_the_job_elsewhere_from_its_checkpoint(
        workers: list[Worker], tmp_path: Path, slow_params: dict[str, object]) -> None:
    first = start_worker(workers, "kill-q", tmp_path)
    job = submit("slow", slow_params, queue="kill-q")
    wait_for_event(job, EventKind.CHECKPOINT)
    kill_worker_running(job, first)

    start_worker(workers, "kill-q", tmp_path)
    assert job.wait(timeout=180) is JobStatus.SUCCEEDED, job.info()["error"]
    events = list(job.events())
    resumed = [e for e in events if e.kind is EventKind.RESUMED]
    assert len(resumed) == 1 and (resumed[0].step or 0) >= 1
    assert f"step {resumed[0].step}" in resumed[0].message
    after = [e.step for e in events[events.index(resumed[0]):] if e.kind is EventKind.LOG and "loss" in e.metrics]
    assert after[0] == (resumed[0].step or 0) + 1 > 1
    assert [e.kind for e in events].count(EventKind.REQUEUED) == 1
    assert [e.kind for e in events].count(EventKind.STARTED) == 2
    assert job.info()["attempts"] == 2
    assert_one_final_model(job)


def test_a_job_survives_two_kills_in_a_row(workers: list[Worker], tmp_path: Path,
                                           slow_params: dict[str, object]) -> None:
    w = start_worker(workers, "kill2-q", tmp_path)
    job = submit("slow", {**slow_params, "MAX_STEPS": 30}, queue="kill2-q")
    for round_ in (1, 2):
        wait_for_event(job, EventKind.CHECKPOINT, count=2 * round_ - 1)
        kill_worker_running(job, w)
        w = start_worker(workers, "kill2-q", tmp_path)
        wait_for_event(job, EventKind.RESUMED, count=round_)
    assert job.wait(timeout=180) is JobStatus.SUCCEEDED, job.info()["error"]
    assert kinds(job).count(EventKind.RESUMED) == 2 and job.info()["attempts"] == 3
    steps = log_steps(job)
    assert steps[-1] == 30 and set(range(1, 31)) <= set(steps)
    assert_one_final_model(job)


def test_a_job_that_keeps_losing_its_worker_fails_after_max_resumes(
        workers: list[Worker], tmp_path: Path, slow_params: dict[str, object],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from deepe_tasks.core.settings import get_settings
    from deepe_tasks.fixtures.embedded import RedisServer

    # Any live worker's reaper may requeue a lost job, so DEEPE_MAX_RESUMES must be the same on
    # every worker of a Redis (docs/reliability.md): this test's workers get a Redis of their own.
    server = RedisServer(folder=tmp_path / "redis").start()
    monkeypatch.setenv("DEEPE_REDIS_URL", server.url)
    get_settings.cache_clear()
    try:
        w = start_worker(workers, "resumes-q", tmp_path, DEEPE_MAX_RESUMES="0", DEEPE_REDIS_URL=server.url)
        job = submit("slow", slow_params, queue="resumes-q")
        wait_for_event(job, EventKind.TRAINING)
        kill_worker_running(job, w)
        start_worker(workers, "resumes-q", tmp_path, DEEPE_MAX_RESUMES="0", DEEPE_REDIS_URL=server.url)
        assert job.wait(timeout=60) is JobStatus.FAILED
        assert "lost its worker 1 times" in job.info()["error"] and "DEEPE_MAX_RESUMES is 0" in job.info()["error"]
        assert job.info()["losses"] == 1
    finally:
        for started in workers:
            started.stop()
        server.stop()
        monkeypatch.undo()
        get_settings.cache_clear()


def test_a_duplicate_delivery_never_trains_the_job_twice(workers: list[Worker], tmp_path: Path,
                                                         slow_params: dict[str, object]) -> None:
    from deepe_tasks.core import jobstore
    from deepe_tasks.core.broker import app_for, enqueue
    from deepe_tasks.core.connection import get_redis
    from deepe_tasks.core.settings import get_settings

    app = app_for(get_settings().redis_url)

    start_worker(workers, "dup-q", tmp_path)
    start_worker(workers, "dup-q", tmp_path)
    job = submit("slow", {**slow_params, "MAX_STEPS": 12}, queue="dup-q")
    wait_for_event(job, EventKind.TRAINING)
    enqueue(jobstore.get(get_redis(), job.id))  # the same message, a second time
    assert job.wait(timeout=120) is JobStatus.SUCCEEDED
    wait_for(lambda: app.AsyncResult(job.id).state == "SUCCESS", timeout=30)
    record = job.info()
    enqueue(jobstore.get(get_redis(), job.id))  # and once more, late, after it finished
    wait_for(lambda: "it is already succeeded" in "".join(w.log() for w in workers), timeout=60)
    assert kinds(job).count(EventKind.STARTED) == 1
    assert log_steps(job) == list(range(1, 13))
    assert "holds its lease" in "".join(w.log() for w in workers)
    # The late duplicate touched nothing: neither the job nor Celery's state of it
    assert job.info() == record
    assert app.AsyncResult(job.id).state == "SUCCESS"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_warm_shutdown_checkpoints_requeues_and_the_job_resumes(workers: list[Worker], tmp_path: Path,
                                                                  slow_params: dict[str, object],
                                                                  sig: signal.Signals) -> None:
    first = start_worker(workers, "term-q", tmp_path)
    job = submit("slow", slow_params, queue="term-q")
    wait_for_event(job, EventKind.LOG, count=4)
    first.process.signal(sig)
    first.process.proc.wait(timeout=30)  # type: ignore[union-attr]
    events = list(job.events())
    assert events[-1].kind is EventKind.REQUEUED and job.status() is JobStatus.QUEUED
    assert job.info()["losses"] == 0  # a preemption announced by a signal uses up no resume
    checkpoints = [e.step for e in events if e.kind is EventKind.CHECKPOINT]
    start_worker(workers, "term-q", tmp_path)
    assert job.wait(timeout=120) is JobStatus.SUCCEEDED, job.info()["error"]
    assert job.info()["losses"] == 0 and job.info()["attempts"] == 2
    resumed = [e for e in job.events() if e.kind is EventKind.RESUMED]
    assert resumed[0].step == checkpoints[-1]
    assert_one_final_model(job)


def test_cancelling_a_running_job_stops_it_at_a_step_with_a_checkpoint(
        worker: Worker, slow_params: dict[str, object], storage: Path) -> None:
    job = submit("slow", slow_params)
    wait_for_event(job, EventKind.LOG, count=2)
    pid = job.info()["pid"]
    assert job.cancel() is JobStatus.RUNNING  # asked; it stops at its next step
    assert job.wait(timeout=60) is JobStatus.CANCELLED
    events = list(job.events())
    assert events[-1].kind is EventKind.CANCELLED and "cancelled at step" in events[-1].message
    assert EventKind.CHECKPOINT in [e.kind for e in events]
    assert max(log_steps(job)) < 24
    assert not Path(job.info()["output_dir"]).exists()  # no final model
    assert list((storage / "jobs" / job.id / "attempts" / "1" / "checkpoints").glob("checkpoint-*"))
    assert process_gone(pid)


def test_cancel_with_save_publishes_a_partial_model(worker: Worker, slow_params: dict[str, object]) -> None:
    job = submit("slow", slow_params)
    wait_for_event(job, EventKind.LOG, count=2)
    job.cancel(save=True)
    assert job.wait(timeout=60) is JobStatus.CANCELLED
    manifest = json.loads((Path(job.info()["output_dir"]) / "deepe.json").read_text())
    assert manifest["partial"] is True and manifest["steps"] < 24


def test_a_cancel_with_save_gets_the_grace_again_once_saving_began(
        workers: list[Worker], tmp_path: Path, store: Path, slow_params: dict[str, object]) -> None:
    # Given a job whose steps and final save each take longer than half the cancel grace
    write_method(store, "slowsave", SLOW_SAVE)
    # (margins for a loaded machine: 3.5 s for reaching the step and its checkpoint, 2.5 s for
    # the save alone; the two together always take longer than the grace)
    start_worker(workers, "csgrace-q", tmp_path, DEEPE_CANCEL_GRACE="6")
    job = submit("slowsave", {**slow_params, "step_sleep": 2.5, "save_sleep": 3.5}, queue="csgrace-q")
    wait_for_event(job, EventKind.LOG, count=2)
    # When it is cancelled with save: reaching the step, the checkpoint and the save together
    # take longer than DEEPE_CANCEL_GRACE, the save alone does not
    job.cancel(save=True)
    # Then the save is not cut short: the partial model is published
    assert job.wait(timeout=60) is JobStatus.CANCELLED
    assert "the partial model was saved" in job.info()["error"]
    manifest = json.loads((Path(job.info()["output_dir"]) / "deepe.json").read_text())
    assert manifest["partial"] is True


HANGS_IN_A_STEP = SLOW_METHOD.replace(
    "time.sleep(float(params.get('step_sleep', 0.25)))",
    "time.sleep(3600 if args[1].global_step >= 3 else 0.1)")


def test_a_running_job_that_ignores_the_cancel_is_killed_after_the_grace_period(
        workers: list[Worker], tmp_path: Path, store: Path, slow_params: dict[str, object]) -> None:
    write_method(store, "hangs", HANGS_IN_A_STEP)
    start_worker(workers, "hang-q", tmp_path, DEEPE_CANCEL_GRACE="3")
    job = submit("hangs", slow_params, queue="hang-q")
    wait_for_event(job, EventKind.LOG, count=2)
    pid = job.info()["pid"]
    job.cancel()
    assert job.wait(timeout=60) is JobStatus.CANCELLED
    assert "did not stop within DEEPE_CANCEL_GRACE=3 s and was killed" in job.info()["error"]
    assert kinds(job)[-1] is EventKind.CANCELLED and process_gone(pid)
    # The worker lives on and runs the next job.
    assert submit("slow", {**slow_params, "MAX_STEPS": 2}, queue="hang-q").wait(timeout=120) is JobStatus.SUCCEEDED


def test_the_time_limit_stops_training_keeps_a_checkpoint_and_fails_the_job(
        worker: Worker, slow_params: dict[str, object], storage: Path) -> None:
    job = submit("slow", {**slow_params, "MAX_STEPS": 200}, time_limit=4)
    assert job.wait(timeout=120) is JobStatus.FAILED
    error = job.info()["error"]
    step = max(log_steps(job))
    assert f"time limit of 4 s reached at step {step}" in error
    assert list((storage / "jobs" / job.id / "attempts" / "1" / "checkpoints").glob(f"checkpoint-{step}"))


def test_redis_restarting_mid_job_loses_no_event(tmp_path: Path, slow_params: dict[str, object],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from deepe_tasks.core.settings import get_settings
    from deepe_tasks.fixtures.embedded import RedisServer

    server = RedisServer(appendonly=True, folder=tmp_path / "redis").start()
    monkeypatch.setenv("DEEPE_REDIS_URL", server.url)
    get_settings.cache_clear()
    # The outage is shorter than the lease, as it must be in a deployment (docs/reliability.md).
    w = Worker("gpu", tmp_path / "worker.log", env={**FAST, "DEEPE_LEASE_TTL": "30", "DEEPE_REDIS_URL": server.url})
    try:
        w.start()
        job = submit("slow", {**slow_params, "MAX_STEPS": 30, "step_sleep": 0.3})
        wait_for_event(job, EventKind.LOG, count=3)
        # When Redis goes away for a few seconds mid-training, and comes back with its AOF
        server.stop()
        # (it lasts until the worker has found Redis gone, with the job still training)
        wait_for(lambda: "could not reach Redis" in w.log(), timeout=60)
        server.start()
        # Then the job finishes, its state is recorded and every step's event is there, in order
        assert job.wait(timeout=180) is JobStatus.SUCCEEDED, job.info()["error"]
        assert log_steps(job) == list(range(1, 31))
        events = list(job.events())
        assert [e.kind for e in events].count(EventKind.STARTED) == 1
        assert events[-1].kind is EventKind.SUCCEEDED
        assert [e.id for e in events] == sorted((e.id for e in events), key=lambda i: tuple(map(int, (i or "").split("-"))))
    finally:
        w.stop()
        server.stop()
        monkeypatch.undo()
        get_settings.cache_clear()
