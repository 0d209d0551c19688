"""Faults beside the named ones: a blip at the claim, a zygote that does not answer, a value
that cannot be sent, a pool process that stops. None of them may hang a worker for ever.

(Issue 23, defect 1: a Redis blip right after a claim hung the pool process in
`ForkedJob.wait()`, while the worker still answered pings.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

from deepe_tasks import JobStatus, submit
from deepe_tasks.core import keys
from tests.faultproxy import FaultProxy
from tests.helpers import TRL_SNIPPET, Worker, wait_for, write_method


@pytest.fixture
def method(store: Path) -> str:
    return write_method(store, "blip_sft", TRL_SNIPPET)


@pytest.fixture
def params(sft_params: dict[str, Any]) -> dict[str, Any]:
    return {**sft_params, "MAX_STEPS": 2, "PromptInputColumn": "instruction", "PromptOutputColumn": "output"}


def redis_port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


@pytest.mark.e2e
@pytest.mark.parametrize("blackout", [1.5, 4.0])
def test_a_redis_blip_right_after_a_claim_does_not_hang_the_worker(
        workers: list[Worker], tmp_path: Path, redis_url: str, method: str, params: dict[str, Any],
        blackout: float) -> None:
    # Given a worker (lease TTL 5 s) whose every link to Redis goes through a proxy that cuts
    # them all, for `blackout` seconds, the moment the worker makes the attempt's Redis user:
    # right after its claim, before the job process has its job
    queue = f"blip-{int(blackout * 10)}"
    with FaultProxy(redis_port(redis_url), trigger=b"SETUSER", blackout=blackout) as proxy:
        w = Worker(queue, tmp_path / "worker.log", env={
            "DEEPE_REDIS_URL": proxy.url(redis_url), "DEEPE_LEASE_TTL": "5"}).start()
        workers.append(w)

        # When a job is submitted to its queue
        job = submit(method, params, queue=queue)

        # Then the blip struck, and the job still succeeds on that worker: within the bound the
        # hand-over waits (half a lease) on the same attempt, past it on a requeued one
        status = job.wait(timeout=240)
        assert proxy.fired_at, "the fault was never injected"
        assert status is JobStatus.SUCCEEDED, (job.info().get("error"), w.log()[-3000:])
        # And the worker is not stuck: it takes the next job at once
        again = submit(method, params, queue=queue)
        assert again.wait(timeout=180) is JobStatus.SUCCEEDED, w.log()[-3000:]
    assert w.alive()


def test_a_spare_never_handed_its_job_is_given_back_and_a_dead_one_is_reported() -> None:
    from deepe_tasks.worker.processes import kill_group, spawn_zygote
    from deepe_tasks.worker.warm import WarmStart

    # Given a real zygote and the spare it offers for the next job
    warm = WarmStart(spawn_zygote)
    try:
        spare = warm.take(wait=120)
        assert spare is not None

        # When the job is dropped before the spare was handed its spec (a Redis blip, a value
        # that cannot be sent) and the worker cleans up after the attempt
        kill_group(spare)

        # Then the spare was given back, alive, and is offered to the next job
        assert psutil.pid_exists(spare.pid)
        again = warm.take(wait=30)
        assert again is not None and again.pid == spare.pid

        # And when a spare dies before its hand-over, whoever holds it hears of it: no wait
        # on it can last for ever
        os.kill(again.pid, signal.SIGKILL)
        assert again.wait(timeout=30) == -signal.SIGKILL
        replacement = warm.take(wait=60)
        assert replacement is not None and replacement.pid != again.pid
    finally:
        warm.close()


def test_a_zygote_that_does_not_answer_is_replaced_within_the_handover_bound() -> None:
    from deepe_tasks.worker.processes import kill_group, spawn_zygote
    from deepe_tasks.worker.warm import WarmStart
    from deepe_tasks.worker.zygote_client import HandoverFailed

    # Given a real zygote, its spare, and a hand-over bound of 3 s
    warm = WarmStart(spawn_zygote)
    try:
        spare = warm.take(wait=120, start_timeout=3.0)
        assert spare is not None
        zygote = spare.zygote.proc

        # When the zygote stops answering just as a job is handed to it
        os.kill(zygote.pid, signal.SIGSTOP)
        # Then the hand-over fails within its bound instead of waiting for ever
        with pytest.raises(HandoverFailed, match="did not start the job within 3 s"):
            spare.start("{}")
        kill_group(spare)  # what the worker does next: it returns, the process counts as killed
        assert spare.returncode == -signal.SIGKILL

        # And the stopped zygote was killed and a new one gives the next spare
        assert zygote.wait(timeout=30) == -signal.SIGKILL
        fresh = warm.take(wait=120)
        assert fresh is not None and fresh.zygote.proc.pid != zygote.pid
    finally:
        warm.close()


@pytest.mark.e2e
def test_a_job_whose_values_cannot_be_sent_ends_and_the_worker_goes_on(
        workers: list[Worker], tmp_path: Path, r: redis.Redis, method: str, params: dict[str, Any]) -> None:
    # Given a queued job whose stored parameters hold a lone surrogate, as an older deepe let
    # through (valid JSON: "\udc80"), and no worker on its queue yet
    job = submit(method, params, queue="poisoned")
    stored = json.loads(r.hget(keys.job(job.id), "params") or "{}")
    stored["note"] = "\udc80"
    r.hset(keys.job(job.id), "params", json.dumps(stored))

    # When a worker takes it
    w = Worker("poisoned", tmp_path / "worker.log").start()
    workers.append(w)

    # Then the job ends (it is not handed from worker to worker for ever)
    status = job.wait(timeout=180)
    assert status in (JobStatus.FAILED, JobStatus.SUCCEEDED), w.log()[-3000:]
    if status is JobStatus.FAILED:
        assert "parameters" in (job.info().get("error") or "")
    # And the worker takes the next job
    assert submit(method, params, queue="poisoned").wait(timeout=180) is JobStatus.SUCCEEDED, w.log()[-3000:]


def pool_process(worker: Worker) -> psutil.Process:
    assert worker.process.proc is not None
    main = psutil.Process(worker.process.proc.pid)
    return wait_for(lambda: next((c for c in main.children() if "zygote" not in " ".join(c.cmdline())), None),
                    timeout=30)


@pytest.mark.e2e
def test_a_worker_whose_pool_process_stops_says_so_exits_and_its_job_resumes(
        workers: list[Worker], tmp_path: Path, store: Path, params: dict[str, Any]) -> None:
    from tests.helpers import SLOW_METHOD

    slow = write_method(store, "stuck_slow", SLOW_METHOD)
    # Given a worker that counts itself stuck after 8 s without progress on a claimed job,
    # training a slow job
    env = {"DEEPE_LEASE_TTL": "4", "DEEPE_STUCK_TIMEOUT": "8"}
    stuck = Worker("stuck-q", tmp_path / "stuck.log", env=env).start()
    workers.append(stuck)
    job = submit(slow, {**params, "MAX_STEPS": 30, "step_sleep": 0.5}, queue="stuck-q")
    wait_for(lambda: (p := job.progress()) is not None and (p.step or 0) >= 1, timeout=120)

    # When its pool process stops answering (SIGSTOP: a wedged process, as far as anyone can see)
    pool = pool_process(stuck)
    pool.send_signal(signal.SIGSTOP)

    # Then the worker says why in its log and exits with code 70, for its supervisor to restart it
    assert stuck.process.proc is not None
    try:
        code = stuck.process.proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("the stuck worker did not exit:\n" + stuck.log()[-3000:])
    assert code == 70
    assert "this worker is stuck" in stuck.log() and job.id in stuck.log()
    assert not psutil.pid_exists(pool.pid) or pool.status() == psutil.STATUS_ZOMBIE

    # And another worker resumes the job once its lease expired, and it succeeds
    workers.append(Worker("stuck-q", tmp_path / "next.log", env=env).start())
    assert job.wait(timeout=240) is JobStatus.SUCCEEDED
    assert job.info()["attempts"] >= 2


def test_a_spec_that_cannot_be_serialised_fails_the_job_with_the_reason_and_starts_nothing(
        tmp_path: Path) -> None:
    # Unit tier, beside the end-to-end test above (where records now read back clean, so the
    # hand-over's own refusal is no longer reached): a record whose values pydantic cannot write.
    from types import SimpleNamespace

    from deepe_tasks.core.records import JobRecord
    from deepe_tasks.core.settings import Settings
    from deepe_tasks.worker.handover import NotHandedOver, hand_over

    record = JobRecord(id="j1", method="m", method_sha256="0" * 64, params={"note": "\udc80"}, output_dir="o",
                       queue="q", worker="w", started_at=1.0)
    credential = SimpleNamespace(url="redis://127.0.0.1:1/0", username="u", password="p")
    attempt = SimpleNamespace(settings=Settings(storage_root=tmp_path), record=record, number=1, holder="w:1:aa",
                              credential=SimpleNamespace(create=lambda: credential))
    started: list[str] = []
    proc = SimpleNamespace(pid=123, start=started.append)

    with pytest.raises(NotHandedOver) as raised:
        hand_over(attempt, "source", proc)  # type: ignore[arg-type]

    assert raised.value.result.status is JobStatus.FAILED and not raised.value.preempted
    assert "cannot be sent to its job process" in (raised.value.result.error or "")
    assert started == []  # the job process was never handed a spec


@pytest.mark.e2e
def test_a_message_taken_by_a_worker_lost_before_its_claim_is_sent_again(
        workers: list[Worker], tmp_path: Path, r: redis.Redis, method: str, params: dict[str, Any]) -> None:
    from deepe_tasks.core import keys as deepe_keys

    env = {"DEEPE_LEASE_TTL": "5"}  # a delivery unclaimed for 2 T + 30 s = 40 s counts as lost
    # Given a worker whose pool process is stopped: its main process still takes a message
    lost = Worker("unclaimed-q", tmp_path / "lost.log", env=env).start()
    workers.append(lost)
    os.kill(pool_process(lost).pid, signal.SIGSTOP)
    job = submit(method, params, queue="unclaimed-q")
    wait_for(lambda: f"[{job.id}] received" in lost.log(), timeout=60)

    # When that worker is lost (SIGKILL of its whole process group) before it claimed the job
    assert lost.process.proc is not None
    os.killpg(lost.process.proc.pid, signal.SIGKILL)
    lost.process.proc.wait(timeout=30)
    assert job.status() is JobStatus.QUEUED and job.info()["attempts"] == 0
    assert any(job.id in v for v in r.hvals(deepe_keys.KOMBU_UNACKED))  # the message sits with the dead worker

    # Then another worker's reaper sends the job again, and it runs (not days later)
    other = Worker("unclaimed-q", tmp_path / "other.log", env=env).start()
    workers.append(other)
    assert job.wait(timeout=240) is JobStatus.SUCCEEDED, (job.info().get("error"), other.log()[-3000:])
    assert job.info()["attempts"] == 1
    # and the dead delivery was dropped (the new one is acknowledged as its task returns)
    wait_for(lambda: not any(job.id in v for v in r.hvals(deepe_keys.KOMBU_UNACKED)), timeout=30)


@pytest.mark.e2e
def test_an_idle_worker_whose_consumer_takes_nothing_says_so_exits_and_another_runs_the_job(
        workers: list[Worker], tmp_path: Path, store: Path, redis_url: str, method: str,
        params: dict[str, Any]) -> None:
    from deepe_tasks.core.broker import app_for
    from tests.helpers import SLOW_METHOD

    slow = write_method(store, "stall_slow", SLOW_METHOD)
    # Given a worker that counts its consumer stalled after 3 s of messages waiting while idle
    env = {"DEEPE_LEASE_TTL": "4", "DEEPE_CONSUMER_STALL_TIMEOUT": "3"}
    first = Worker("stall-q", tmp_path / "first.log", env=env).start()
    workers.append(first)
    # a job that waits longer than that behind a running one is no stall: the worker is busy
    running = submit(slow, {**params, "MAX_STEPS": 10, "step_sleep": 0.5}, queue="stall-q")
    behind = submit(method, params, queue="stall-q")
    assert running.wait(timeout=180) is JobStatus.SUCCEEDED
    assert behind.wait(timeout=120) is JobStatus.SUCCEEDED
    assert first.alive() and "consumer has taken no message" not in first.log()

    # When its Celery consumer stops taking messages while the worker stays up (what a consumer
    # that reconnected after a broker failover and consumes nothing looks like: celery#10096),
    # here by cancelling its consumer, and a job is queued for it
    replies = app_for(redis_url).control.cancel_consumer("stall-q", destination=[first.hostname], reply=True)
    assert replies and "ok" in next(iter(replies[0].values()))
    job = submit(method, params, queue="stall-q")

    # Then the worker says why in its log and exits with code 70, for its supervisor to restart it
    assert first.process.proc is not None
    try:
        code = first.process.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the stalled worker did not exit:\n" + first.log()[-3000:])
    assert code == 70, first.log()[-3000:]
    assert "consumer has taken no message" in first.log() and "stall-q" in first.log()
    assert job.status() is JobStatus.QUEUED
    # And the restarted worker runs the job that waited
    workers.append(Worker("stall-q", tmp_path / "next.log", env=env).start())
    assert job.wait(timeout=120) is JobStatus.SUCCEEDED
