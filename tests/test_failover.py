"""Redis high availability, against real processes: a primary, its replica and three sentinels
(`tests/sentinel.py`), real workers and real TRL training. A primary that dies or fails over
loses no acknowledged job and never lets one train twice or publish twice.

(Issue 25. tests/unit/test_failover_config.py has the settings and the storage fences alone.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from deepe_tasks import JobStatus, submit
from deepe_tasks.core import jobstore, keys
from deepe_tasks.core.errors import BrokerUnavailable, DeepeError
from deepe_tasks.core.events import read_events
from deepe_tasks.core.fences import CLAIM_MARKER, MANIFEST
from deepe_tasks.core.records import Event, EventKind
from deepe_tasks.core.settings import get_settings
from deepe_tasks.fixtures.embedded import free_port
from deepe_tasks.queue.client import Job, merge
from tests.helpers import SLOW_METHOD, SLOW_SAVE, Worker, wait_for, write_method
from tests.sentinel import FORCED_FAILOVER_PAUSE_S, Topology
from tests.sse_client import Follower, running_api

FINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}


def _topology(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, replicas: int) -> Iterator[Topology]:
    with Topology(tmp_path / "redis", replicas=replicas) as topology:
        monkeypatch.setenv("DEEPE_REDIS_URL", topology.url)
        monkeypatch.setenv("DEEPE_REDIS_SENTINEL_MASTER", topology.master_name)
        get_settings.cache_clear()
        try:
            yield topology
        finally:
            get_settings.cache_clear()


@pytest.fixture
def topo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Topology]:
    """A primary, one replica and three sentinels; this test and the workers it starts use them."""
    yield from _topology(tmp_path, monkeypatch, replicas=1)


@pytest.fixture
def topo2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Topology]:
    """Two replicas: after a failover one is left to acknowledge writes (DEEPE_REDIS_MIN_REPLICAS=1)."""
    yield from _topology(tmp_path, monkeypatch, replicas=2)


@pytest.fixture
def params(sft_params: dict[str, Any], storage: Path) -> dict[str, Any]:
    return {**sft_params, "PromptInputColumn": "instruction", "PromptOutputColumn": "output"}


def settle(job: Job, timeout: float) -> JobStatus:
    """The job's final status, asking again while a failover is under way."""
    def final() -> JobStatus | None:
        try:
            status = job.status()
        except (redis.RedisError, DeepeError):
            return None
        return status if status in FINAL else None

    status: JobStatus = wait_for(final, timeout=timeout, interval=0.5)
    return status


def last_step(job_id: str) -> int:
    try:
        events = list(read_events(redis_client(), job_id))
    except redis.RedisError:
        return 0
    return max((e.step or 0 for e in events if e.kind is EventKind.LOG), default=0)


def redis_client() -> redis.Redis:
    from deepe_tasks.core.connection import get_redis

    return get_redis()


def steps_by_attempt(job_id: str) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for event in read_events(redis_client(), job_id):
        if event.kind is EventKind.LOG and event.step is not None and "loss" in event.metrics:
            out.setdefault(event.attempt or 0, []).append(event.step)
    return out


def assert_contiguous(steps: dict[int, list[int]], max_steps: int) -> None:
    """Within each attempt, every step once and in order; the last attempt reaches the end."""
    assert steps, "no step was logged"
    for attempt, seen in steps.items():
        assert seen == list(range(seen[0], seen[0] + len(seen))), f"attempt {attempt} logged steps {seen}"
    assert steps[max(steps)][-1] == max_steps, steps


def assert_one_model(output: Path, job_id: str) -> dict[str, Any]:
    """The model is published once, whole, and nothing staged or moved aside stays beside it."""
    manifest: dict[str, Any] = json.loads((output / MANIFEST).read_text())
    assert manifest["job"] == job_id and manifest["claim"]
    leftovers = [p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")]
    assert not leftovers, leftovers
    return manifest


@pytest.fixture
def api(tmp_path: Path, topo2: Topology) -> Iterator[str]:
    with running_api(tmp_path / "api.log") as base:
        yield base


def train_slowly(store: Path, storage: Path, tmp_path: Path, workers: list[Worker], params: dict[str, Any],
                 queue: str, max_steps: int, step_sleep: float) -> tuple[Worker, Job, Path]:
    """A worker of its own (lease TTL 10 s) training a slow job on ``queue``, past its fourth step."""
    method = write_method(store, queue.replace("-", "_"), SLOW_METHOD)
    w = Worker(queue, tmp_path / "worker.log", env={"DEEPE_LEASE_TTL": "10"}).start()
    workers.append(w)
    output = storage / "models" / queue
    job = submit(method, {**params, "MAX_STEPS": max_steps, "step_sleep": step_sleep, "OUTPUT_DIR": str(output)},
                 queue=queue)
    wait_for(lambda: last_step(job.id) >= 4, timeout=240)
    return w, job, output


@pytest.mark.e2e
def test_a_primary_killed_mid_job_fails_over_and_the_job_trains_on_once(
        topo2: Topology, api: str, workers: list[Worker], tmp_path: Path, store: Path, storage: Path,
        params: dict[str, Any]) -> None:
    # Given a worker (lease TTL 10 s) and an SSE follower, on a primary with two replicas
    topo = topo2
    w, job, output = train_slowly(store, storage, tmp_path, workers, params, "fo-kill", 24, 0.4)
    follower = Follower(api, job.id)

    # When the primary is killed mid-training
    old = topo.primary_port()
    killed_at, step_at_kill = time.monotonic(), last_step(job.id)
    topo.kill(old)
    new = topo.wait_for_new_primary(old)
    promoted_after = time.monotonic() - killed_at
    wait_for(lambda: last_step(job.id) > step_at_kill, timeout=120, interval=0.2)
    next_step_after = time.monotonic() - killed_at

    # Then the job trains on and succeeds: each step logged once, one model
    assert settle(job, timeout=300) is JobStatus.SUCCEEDED, (job.info().get("error"), w.log()[-4000:])
    steps = steps_by_attempt(job.id)
    assert_contiguous(steps, 24)
    manifest = assert_one_model(output, job.id)
    # The outage was shorter than the lease: the same attempt went on (its Redis user made
    # again on the new primary, which Redis does not replicate)
    assert list(steps) == [1] and manifest["attempt"] == 1, steps
    # And the follower (reconnecting with Last-Event-ID) saw every event once, to the end
    follower.thread.join(timeout=60)
    assert follower.events and follower.events[-1]["kind"] == "succeeded", follower.events[-3:]
    assert len(follower.ids) == len(set(follower.ids))
    followed = [e["step"] for e in follower.events if e["kind"] == "log" and "loss" in e.get("metrics", {})]
    # (it shows an event only once a replica has it: tests/test_replicated_reads.py)
    assert followed == steps[1], followed
    # And the worker is alive, its attempt's user gone from the new primary, and a job
    # submitted after the failover runs
    assert w.alive()
    users = topo.client(new).acl_users()
    assert not [u for u in users if str(u).startswith(f"deepe-attempt-{job.id}")], users
    after = submit("fo_kill", {**params, "MAX_STEPS": 2, "step_sleep": 0}, queue="fo-kill")
    assert settle(after, timeout=180) is JobStatus.SUCCEEDED
    print(f"\nfailover: primary promoted {promoted_after:.1f} s after the kill, next step logged after "
          f"{next_step_after:.1f} s; follower reconnected {follower.reconnects} times")


@pytest.mark.e2e
def test_a_second_failover_right_after_the_first_loses_no_event(
        topo2: Topology, workers: list[Worker], tmp_path: Path, store: Path, storage: Path,
        params: dict[str, Any]) -> None:
    # Given a job training on a primary with two replicas (found by bench/failover.py, seed 2:
    # the job process, which does not see the worker's DEEPE_REDIS_URL, took its events as
    # acknowledged by no replica, and a primary demoted a moment later dropped them)
    topo = topo2
    w, job, output = train_slowly(store, storage, tmp_path, workers, params, "fo-twice", 30, 0.3)

    # When the primary is killed, and the replica promoted in its place stops right after, past
    # down-after (the sentinels promote the other replica, and demote it once it is back)
    first = topo.primary_port()
    topo.kill(first)
    second = topo.wait_for_new_primary(first)
    topo.restart(first)
    time.sleep(0.3)
    topo.pause(second)
    time.sleep(FORCED_FAILOVER_PAUSE_S)
    topo.resume(second)
    topo.wait_for_new_primary(second, timeout=60)

    # Then the job succeeds and its stream has every step, once: what the demoted primary took
    # unacknowledged was sent again to the new one
    assert settle(job, timeout=300) is JobStatus.SUCCEEDED, (job.info().get("error"), w.log()[-4000:])
    steps = steps_by_attempt(job.id)
    assert_contiguous(steps, 30)
    jsonl = [json.loads(line) for line in (storage / "jobs" / job.id / "events.jsonl").read_text().splitlines()]
    logged = {(e["attempt"], e["step"]) for e in jsonl if e["kind"] == "log" and "loss" in e.get("metrics", {})}
    assert logged == {(attempt, step) for attempt, seen in steps.items() for step in seen}
    assert_one_model(output, job.id)


@pytest.mark.e2e
def test_writes_a_stale_replica_never_got_are_never_acknowledged(
        topo: Topology, workers: list[Worker], tmp_path: Path, store: Path, storage: Path,
        params: dict[str, Any]) -> None:
    # Given a job training (lease TTL 10 s) and one queued behind it, both acknowledged
    method = write_method(store, "stale_sft", SLOW_METHOD)
    w = Worker("fo-stale", tmp_path / "worker.log", env={"DEEPE_LEASE_TTL": "10"}).start()
    workers.append(w)
    outputs = {name: storage / "models" / f"fo-stale-{name}" for name in ("a", "b", "c")}
    training = submit(method, {**params, "MAX_STEPS": 20, "step_sleep": 0.4, "OUTPUT_DIR": str(outputs["a"])},
                      queue="fo-stale")
    queued = submit(method, {**params, "MAX_STEPS": 2, "step_sleep": 0, "OUTPUT_DIR": str(outputs["b"])},
                    queue="fo-stale")
    wait_for(lambda: last_step(training.id) >= 3, timeout=240)
    primary = topo.primary_port()
    replica = next(p for p in topo.server_ports() if p != primary)

    # When the replica stops acknowledging (SIGSTOP), a job is submitted, and then the primary
    # dies and the stale replica is promoted
    topo.pause(replica)
    paused_at = time.monotonic()
    with pytest.raises(BrokerUnavailable, match="DEEPE_REDIS_MIN_REPLICAS=1"):
        submit(method, {**params, "MAX_STEPS": 2, "OUTPUT_DIR": str(outputs["c"])}, queue="fo-stale")
    time.sleep(max(0.0, 4 - (time.monotonic() - paused_at)))
    topo.kill(primary)
    topo.resume(replica)
    assert topo.wait_for_new_primary(primary, timeout=60) == replica
    # (the dead primary's host comes back, empty, as the new primary's replica, as a server
    # that keeps nothing on disk must (docs/operations.md): until it has synced nothing can be
    # acknowledged, and the training job is cut off if that takes longer than its lease)
    topo.restart(primary)
    topo.wait_settled()

    # Then every acknowledged job exists and succeeds, once, with one model each
    for job, output, max_steps in ((training, outputs["a"], 20), (queued, outputs["b"], 2)):
        assert settle(job, timeout=400) is JobStatus.SUCCEEDED, (job.info().get("error"), w.log()[-4000:])
        assert_contiguous(steps_by_attempt(job.id), max_steps)
        assert_one_model(output, job.id)
    # And the refused submit left nothing that runs: its record never reached the replica
    assert not (outputs["c"] / MANIFEST).exists()
    assert w.alive()


@pytest.mark.e2e
@pytest.mark.parametrize("during", ["publish", "merge"])
def test_a_failover_during_a_publish_or_a_merge_publishes_once(
        topo2: Topology, workers: list[Worker], tmp_path: Path, store: Path, storage: Path,
        params: dict[str, Any], during: str) -> None:
    # Given a job whose final save takes 3 s, on a primary with two replicas
    topo = topo2
    method = write_method(store, "failover_save", SLOW_SAVE)
    queue = f"fo-{during}"
    w = Worker(queue, tmp_path / "worker.log", env={"DEEPE_LEASE_TTL": "10"}).start()
    workers.append(w)
    output = storage / "models" / queue
    job = submit(method, {**params, "MAX_STEPS": 3, "step_sleep": 0, "save_sleep": 3 if during == "publish" else 0,
                          "OUTPUT_DIR": str(output)}, queue=queue)
    target, target_job = job, job
    if during == "publish":
        # When the primary dies while the model is being saved
        wait_for(lambda: any(e.kind is EventKind.SAVING for e in read_events(redis_client(), job.id)), timeout=240)
    else:
        assert settle(job, timeout=240) is JobStatus.SUCCEEDED
        # When the primary dies while the job's merge runs
        target = merge(job.id, queue=queue)
        wait_for(lambda: target.status() is JobStatus.RUNNING, timeout=120, interval=0.05)
        output = Path(str(output) + "-merged")
    old = topo.primary_port()
    topo.kill(old)
    topo.wait_for_new_primary(old)

    # Then it succeeds with one published model, and nothing staged stays beside it
    assert settle(target, timeout=300) is JobStatus.SUCCEEDED, (target.info().get("error"), w.log()[-4000:])
    manifest = json.loads((output / MANIFEST).read_text())
    assert manifest["job"] == target.id
    assert not [p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")]
    assert target_job.status() is JobStatus.SUCCEEDED
    assert w.alive()


@pytest.mark.e2e
def test_a_redis_that_rolled_back_a_claim_and_a_finish_trains_no_second_model(
        topo: Topology, workers: list[Worker], tmp_path: Path, store: Path, storage: Path,
        params: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    # Given replication acknowledgements turned off (DEEPE_REDIS_MIN_REPLICAS=0), so that a
    # failover can lose a claim and a finish: only the storage-side fences are left
    monkeypatch.setenv("DEEPE_REDIS_MIN_REPLICAS", "0")
    get_settings.cache_clear()
    method = write_method(store, "rollback_sft", SLOW_METHOD)
    output = storage / "models" / "fo-rollback"
    job = submit(method, {**params, "MAX_STEPS": 3, "step_sleep": 0, "OUTPUT_DIR": str(output)}, queue="fo-rollback")
    primary = topo.primary_port()
    replica = next(p for p in topo.server_ports() if p != primary)
    sync = topo.client(primary).pipeline(transaction=False)
    sync.set("test:sync", "1")
    sync.wait(1, 5000)
    assert sync.execute()[1] == 1  # the replica has the queued job and its message
    # When the replica stops (SIGSTOP), a worker claims the job, trains it and publishes its
    # model, and then the primary dies and the replica, which saw none of that, is promoted
    topo.pause(replica)
    # (once the primary gave up on it, after repl-timeout: until then it still sends writes,
    # which the stopped replica's socket buffers and reads when it is resumed)
    wait_for(lambda: topo.replicas_acking(primary) == 0, timeout=30)
    w = Worker("fo-rollback", tmp_path / "worker.log", env={"DEEPE_LEASE_TTL": "5"}).start()
    workers.append(w)
    assert settle(job, timeout=240) is JobStatus.SUCCEEDED
    first = json.loads((output / MANIFEST).read_text())
    weights = {p.name: p.read_bytes() for p in output.glob("*.safetensors")}
    topo.kill(primary)
    topo.resume(replica)
    assert topo.wait_for_new_primary(primary, timeout=60) == replica
    assert jobstore.get(redis_client(), job.id).attempts == 0  # Redis forgot the claim

    # Then the job is claimed again as attempt 1, which the storage refuses (attempt 1's folder
    # is the first claim's); attempt 2 finds the model the first claim published and adopts it
    assert settle(job, timeout=300) is JobStatus.SUCCEEDED, (job.info().get("error"), w.log()[-4000:])
    record = jobstore.get(redis_client(), job.id)
    assert record.attempts == 2, record
    marker = json.loads((storage / "jobs" / job.id / "attempts" / "1" / CLAIM_MARKER).read_text())
    assert marker["claim"] == first["claim"]
    events: list[Event] = list(read_events(redis_client(), job.id))
    assert any("claimed before by" in (e.message or "") for e in events), [e.message for e in events]
    assert any("already published its model" in (e.message or "") for e in events), [e.message for e in events]
    # One model: the first claim's, untouched
    assert json.loads((output / MANIFEST).read_text()) == first
    assert {p.name: p.read_bytes() for p in output.glob("*.safetensors")} == weights
    assert not steps_by_attempt(job.id).get(2), "attempt 2 trained again"


def test_a_wrong_sentinel_setup_is_refused_at_start_up_with_the_fix(
        topo: Topology, params: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    def worker_says(**env: str) -> str:
        done = subprocess.run([sys.executable, "-m", "deepe_tasks", "worker", "--queues", "fo-config"],
                              env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, (done.returncode, done.stdout[-2000:], done.stderr[-2000:])
        return " ".join((done.stdout + done.stderr).split())

    # An unknown master name
    said = worker_says(DEEPE_REDIS_SENTINEL_MASTER="nope")
    assert "names a primary called 'nope'" in said and "DEEPE_REDIS_SENTINEL_MASTER" in said, said
    # No sentinel reachable
    nowhere = ";".join(f"sentinel://127.0.0.1:{free_port()}" for _ in range(2))
    said = worker_says(DEEPE_REDIS_URL=nowhere)
    assert "start the sentinels" in said, said
    # More replicas asked for than there are
    said = worker_says(DEEPE_REDIS_MIN_REPLICAS="2")
    assert "has 1 replica(s) connected" in said and "DEEPE_REDIS_MIN_REPLICAS=1" in said, said
    # No master name at all
    said = worker_says(DEEPE_REDIS_SENTINEL_MASTER="")
    assert "set DEEPE_REDIS_SENTINEL_MASTER" in said, said

    # And a submit that cannot be replicated fails, leaving nothing that runs
    monkeypatch.setenv("DEEPE_REDIS_MIN_REPLICAS", "2")
    get_settings.cache_clear()
    client = redis_client()
    with pytest.raises(BrokerUnavailable, match="only 1 of DEEPE_REDIS_MIN_REPLICAS=2"):
        submit("sft-demo", params, queue="fo-config")
    failed = [str(j) for j in client.zrange(keys.by_status("failed"), 0, -1)]
    assert len(failed) == 1 and "could not be queued durably" in str(jobstore.get(client, failed[0]).error)
