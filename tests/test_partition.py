"""Real distributed faults: a worker on its own network host loses Redis, and Redis goes away.

A worker runs inside a network namespace (tests/netns.py) and reaches a private Redis over a
veth link; a test cuts that link mid-job, lets another worker take the job over, heals the
link, and checks that the cut-off attempt stopped itself and never wrote again: no event, no
change of the record, no file in OUTPUT_DIR. Each test reads the outcome from Redis and the
shared storage, not from logs.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deepe_tasks import EventKind, Job, JobStatus, submit
from deepe_tasks.core.settings import get_settings
from deepe_tasks.fixtures.embedded import RedisServer
from tests import netns
from tests.helpers import SLOW_METHOD, SLOW_SAVE, Worker, process_gone, wait_for, write_method

pytestmark = pytest.mark.e2e

TTL = 4.0
GRACE = 5.0
FAST = {"DEEPE_LEASE_TTL": f"{TTL:g}", "DEEPE_CHECKPOINT_MINUTES": "0.02", "DEEPE_CANCEL_GRACE": f"{GRACE:g}"}

@pytest.fixture(scope="module", autouse=True)
def methods(store: Path) -> None:
    write_method(store, "slow", SLOW_METHOD)
    write_method(store, "slowsave", SLOW_SAVE)


@pytest.fixture
def params(sft_params: dict[str, object]) -> dict[str, object]:
    return {**sft_params, "MAX_STEPS": 40, "PromptInputColumn": "instruction", "PromptOutputColumn": "output"}


class Cluster:
    """A private Redis, one test host with a worker on it, and workers in the root namespace."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.host = netns.NetHost().create()
        self.redis = RedisServer(folder=tmp_path / "redis", bind=("127.0.0.1", self.host.host_ip)).start()
        self.workers: list[Worker] = []
        self.paused: list[int] = []

    def worker(self, queue: str, on_host: bool = False) -> Worker:
        url = self.redis.url_at(self.host.host_ip) if on_host else self.redis.url
        w = Worker(queue, self.tmp_path / f"worker-{len(self.workers)}.log", env={**FAST, "DEEPE_REDIS_URL": url},
                   prefix=self.host.command([]) if on_host else None)
        self.workers.append(w)
        return w.start()

    def pause(self, pid: int, group: bool = False) -> None:
        """A slow node: stop a process (or its group) dead, until `resume`."""
        (os.killpg if group else os.kill)(pid, signal.SIGSTOP)
        self.paused.append(-pid if group else pid)

    def resume(self) -> None:
        for pid in self.paused:
            try:
                os.killpg(-pid, signal.SIGCONT) if pid < 0 else os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        self.paused.clear()

    def close(self) -> None:
        self.resume()
        self.host.heal()
        for w in self.workers:
            w.stop()
        self.host.remove()
        self.redis.stop()


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    reason = netns.available()
    if reason:
        pytest.skip(reason)
    c = Cluster(tmp_path)
    monkeypatch.setenv("DEEPE_REDIS_URL", c.redis.url)
    get_settings.cache_clear()
    try:
        yield c
    finally:
        c.close()
        monkeypatch.undo()
        get_settings.cache_clear()


def events(job: Job) -> list[Any]:
    return list(job.events())


def wait_for_event(job: Job, kind: EventKind, count: int = 1, attempt: int | None = None,
                   timeout: float = 120) -> None:
    def seen() -> int:
        return sum(1 for e in job.events() if e.kind is kind and attempt in (None, e.attempt))

    wait_for(lambda: seen() >= count or job.status().is_final, timeout=timeout)
    assert seen() >= count, f"no {kind.value} event: {[e.kind.value for e in job.events()]}"


def storage_view(job: Job) -> dict[str, Any]:
    """What the job has in OUTPUT_DIR's folder: every entry of the job, and the model's manifest."""
    out = Path(job.info()["output_dir"])
    entries = sorted(p.name for p in out.parent.iterdir() if job.id in p.name or p == out)
    manifest = out / "deepe.json"
    stat = manifest.stat() if manifest.exists() else None
    return {"entries": entries, "manifest": manifest.read_text() if stat else None,
            "inode": stat.st_ino if stat else None, "mtime": stat.st_mtime_ns if stat else None}


def redis_view(job: Job) -> dict[str, Any]:
    from deepe_tasks.core import keys
    from deepe_tasks.core.connection import get_redis

    r = get_redis()
    return {"record": r.hgetall(keys.job(job.id)), "stream": r.xrange(keys.events(job.id)),
            "lease": r.get(keys.lease(job.id)), "running": r.sismember(keys.RUNNING, job.id)}


def heal_and_check_silence(cluster: Cluster, job: Job, cut_off: Worker) -> None:
    """Heal the partition; the cut-off worker comes back, and writes nothing about the job."""
    from deepe_tasks.core.broker import app_for

    before_redis, before_storage = redis_view(job), storage_view(job)
    cluster.resume()
    cluster.host.heal()
    # The cut-off worker lives on and reconnects: it answers the broker again.
    app = app_for(cluster.redis.url)
    wait_for(lambda: any(cut_off.hostname in r for r in (app.control.ping(timeout=0.5) or [])), timeout=90)
    assert cut_off.alive()
    # Give whatever it buffered every chance to arrive: a round of its own lease renewals and
    # event flushes.
    deadline = time.monotonic() + TTL
    while time.monotonic() < deadline:
        assert redis_view(job) == before_redis
        assert storage_view(job) == before_storage
        time.sleep(0.5)


def attempt_of_model(job: Job) -> int:
    return int(json.loads((Path(job.info()["output_dir"]) / "deepe.json").read_text())["attempt"])


def test_a_partitioned_trainer_stops_itself_and_the_job_resumes_elsewhere_once(
        cluster: Cluster, params: dict[str, object]) -> None:
    # Given a job training on a worker on its own network host
    cut_off = cluster.worker("part-q", on_host=True)
    job = submit("slow", params, queue="part-q")
    wait_for_event(job, EventKind.CHECKPOINT)
    wait_for_event(job, EventKind.LOG, count=6)
    old_pid = job.info()["pid"]
    # When its link to Redis is cut, and another worker is there to take over
    cluster.host.cut()
    cut_at = time.monotonic()
    cluster.worker("part-q")
    # Then the cut-off trainer stops itself within about one lease (checkpoint, then exit)
    wait_for(lambda: process_gone(old_pid), timeout=TTL + GRACE + 15)
    stopped_after = time.monotonic() - cut_at
    assert stopped_after < TTL + GRACE + 15
    # and the job resumes on the other worker from a checkpoint, and succeeds
    assert job.wait(timeout=180) is JobStatus.SUCCEEDED, job.info()["error"]
    resumed = [e for e in events(job) if e.kind is EventKind.RESUMED]
    assert len(resumed) == 1 and resumed[0].attempt == 2 and (resumed[0].step or 0) >= 1
    assert job.info()["attempts"] == 2 and attempt_of_model(job) == 2
    # and exactly one model was published, with nothing else of the job beside it
    view = storage_view(job)
    assert view["entries"] == [Path(job.info()["output_dir"]).name]
    # And when the link comes back, the old worker writes nothing, and lives on
    heal_and_check_silence(cluster, job, cut_off)


def test_a_stale_attempt_paused_in_its_final_save_never_publishes(
        cluster: Cluster, params: dict[str, object], storage: Path) -> None:
    # Given a job whose final save is under way on a worker on its own host
    cut_off = cluster.worker("save-q", on_host=True)
    job = submit("slowsave", {**params, "MAX_STEPS": 8, "save_sleep": 4}, queue="save-q")
    wait_for_event(job, EventKind.SAVING, attempt=1, timeout=180)
    old_pid = job.info()["pid"]
    # When that whole node stalls (worker and job process paused) and is cut off
    cluster.pause(cut_off.process.proc.pid, group=True)  # type: ignore[union-attr]
    cluster.pause(old_pid)
    cluster.host.cut()
    # Then another worker takes the job over after the lease, and publishes its model
    cluster.worker("save-q")
    assert job.wait(timeout=180) is JobStatus.SUCCEEDED, job.info()["error"]
    assert attempt_of_model(job) == 2
    before_redis, before_storage = redis_view(job), storage_view(job)
    # And when the stale job process wakes first, it finishes its save but may not publish
    os.kill(old_pid, signal.SIGCONT)
    cluster.paused.remove(old_pid)
    cluster.host.heal()
    wait_for(lambda: process_gone(old_pid), timeout=TTL + 30)
    result = json.loads((storage / "jobs" / job.id / "attempts" / "1" / "result.json").read_text())
    assert result["status"] == "queued" and "was not published" in result["error"]
    assert redis_view(job) == before_redis
    # The published model is untouched, and the stale attempt took its staging folder away
    after = storage_view(job)
    assert {k: after[k] for k in ("manifest", "inode", "mtime")} == {k: before_storage[k] for k in ("manifest", "inode", "mtime")}
    assert after["entries"] == [Path(job.info()["output_dir"]).name]
    # and its worker, once it wakes too, writes nothing either
    heal_and_check_silence(cluster, job, cut_off)


def test_a_partition_during_a_cancel_with_save_publishes_one_partial_model(
        cluster: Cluster, params: dict[str, object]) -> None:
    # Given a cancel with save whose save is under way on a worker on its own host
    cut_off = cluster.worker("csave-q", on_host=True)
    job = submit("slowsave", {**params, "save_sleep": 3}, queue="csave-q")
    wait_for_event(job, EventKind.LOG, count=4)
    old_pid = job.info()["pid"]
    job.cancel(save=True)
    wait_for_event(job, EventKind.SAVING, attempt=1)
    # When the link is cut in the middle of that save
    cluster.host.cut()
    cluster.worker("csave-q")
    # Then the cut-off attempt cannot publish; the next one saves the partial model, once
    assert job.wait(timeout=180) is JobStatus.CANCELLED, job.info()
    wait_for(lambda: process_gone(old_pid), timeout=TTL + GRACE + 15)
    manifest = json.loads((Path(job.info()["output_dir"]) / "deepe.json").read_text())
    assert manifest["partial"] is True and manifest["attempt"] == 2
    assert storage_view(job)["entries"] == [Path(job.info()["output_dir"]).name]
    heal_and_check_silence(cluster, job, cut_off)


def test_a_cancel_for_a_partitioned_worker_ends_the_job_without_it(
        cluster: Cluster, params: dict[str, object]) -> None:
    # Given a job training on a worker that is then cut off
    cut_off = cluster.worker("ccut-q", on_host=True)
    job = submit("slow", params, queue="ccut-q")
    wait_for_event(job, EventKind.LOG, count=3)
    old_pid = job.info()["pid"]
    cluster.host.cut()
    # When the job is cancelled while its worker cannot hear it
    assert job.cancel() is JobStatus.RUNNING
    cluster.worker("other-q")  # any live worker reaps it
    # Then once the lease ran out the job is cancelled, and the cut-off trainer stopped itself
    assert job.wait(timeout=60) is JobStatus.CANCELLED
    assert "its worker stopped" in job.info()["error"]
    wait_for(lambda: process_gone(old_pid), timeout=TTL + GRACE + 15)
    assert not Path(job.info()["output_dir"]).exists()
    heal_and_check_silence(cluster, job, cut_off)


def test_redis_unreachable_for_two_leases_mid_job(tmp_path: Path, params: dict[str, object],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a job training against a Redis with its AOF on
    server = RedisServer(appendonly=True, folder=tmp_path / "redis").start()
    monkeypatch.setenv("DEEPE_REDIS_URL", server.url)
    get_settings.cache_clear()
    w = Worker("gpu", tmp_path / "worker.log", env={**FAST, "DEEPE_REDIS_URL": server.url})
    try:
        w.start()
        job = submit("slow", {**params, "MAX_STEPS": 30})
        wait_for_event(job, EventKind.CHECKPOINT)
        old_pid = job.info()["pid"]
        # When Redis is gone for two leases
        server.stop()
        stopped = time.monotonic()
        wait_for(lambda: process_gone(old_pid), timeout=2 * TTL + GRACE + 15)  # the trainer stops itself
        time.sleep(max(0.0, 2 * TTL - (time.monotonic() - stopped)))
        server.start()
        # Then the job is requeued, resumes from its checkpoint and succeeds, with one model
        assert job.wait(timeout=180) is JobStatus.SUCCEEDED, job.info()["error"]
        info = job.info()
        assert info["attempts"] == 2 and attempt_of_model(job) == 2
        evs = events(job)
        assert [e.kind for e in evs].count(EventKind.RESUMED) == 1
        # and no event of either attempt is in the stream twice
        seen = [(e.attempt, e.kind, e.step, e.ts) for e in evs]
        assert len(seen) == len(set(seen))
        assert w.alive()
    finally:
        w.stop()
        server.stop()
        monkeypatch.undo()
        get_settings.cache_clear()


def test_a_message_lost_between_redis_and_a_consumer_is_sent_again(cluster: Cluster,
                                                                   params: dict[str, object]) -> None:
    import subprocess

    import redis as redis_py

    from deepe_tasks.core import keys
    from deepe_tasks.core.broker import priority_lists

    # Given an idle worker on its own host, its consumer blocked in BRPOP on its queue
    cluster.worker("blip-q", on_host=True)
    client = redis_py.Redis.from_url(cluster.redis.url, decode_responses=True)
    wait_for(lambda: any(c.get("cmd") == "brpop" and c["addr"].startswith(f"{cluster.host.ns_ip}:")
                         for c in client.client_list()), timeout=30)
    # When its link is cut and a job is queued at once, Redis pops the message for the BRPOP that
    # was waiting and writes it into the dead link (kombu's Redis transport takes a message with
    # BRPOP: at most once, until the consumer has it)
    cluster.host.cut()
    job = submit("slow", {**params, "MAX_STEPS": 4}, queue="blip-q")
    wait_for(lambda: not any(client.llen(name) for _, name in priority_lists("blip-q")), timeout=5)
    assert job.id not in " ".join(str(v) for v in client.hvals(keys.KOMBU_UNACKED))
    # and Redis's end of those connections gives up before the link is back (as TCP does after
    # its retries, or a keepalive, when a host is gone): the reply is dropped with them
    killed = subprocess.run(["ss", "-K", "dst", cluster.host.ns_ip], capture_output=True, text=True)
    if "ESTAB" not in killed.stdout:
        pytest.skip(f"the kernel cannot close sockets here (ss -K): {killed.stderr.strip()}")
    time.sleep(1)
    cluster.host.heal()
    # Then the reaper finds the queued job with its message nowhere and sends it again: it runs, once
    assert job.wait(timeout=120) is JobStatus.SUCCEEDED, job.info()
    assert job.info()["attempts"] == 1
    assert f"job {job.id} is queued, but its message is in no queue" in cluster.workers[0].log()


def test_the_harness_really_partitions(cluster: Cluster) -> None:
    # A check of the test itself: a cut link means no Redis from inside the host.
    import subprocess

    probe = [sys.executable, "-c", f"import redis; redis.Redis(host='{cluster.host.host_ip}', "
             f"port={cluster.redis.port}, socket_connect_timeout=1).ping()"]
    assert subprocess.run(cluster.host.command(probe), capture_output=True, timeout=30).returncode == 0
    cluster.host.cut()
    assert subprocess.run(cluster.host.command(probe), capture_output=True, timeout=30).returncode != 0
    cluster.host.heal()
    wait_for(lambda: subprocess.run(cluster.host.command(probe), capture_output=True, timeout=30).returncode == 0,
             timeout=15)


def wait_just_before_a_renewal(job: Job, renew_every: float) -> int:
    """Return when the job's lease is about to be renewed (an outage that starts now is the
    longest its worker has to ride out), with the lease's time to live, in ms, right after the
    last renewal."""
    from deepe_tasks.core import keys
    from deepe_tasks.core.connection import get_redis

    r = get_redis()
    last = r.pttl(keys.lease(job.id))
    while True:
        now = r.pttl(keys.lease(job.id))
        if now > last + 300:  # renewed just now
            break
        last = now
        time.sleep(0.02)
    time.sleep(renew_every - 0.2)
    return int(now)


def test_an_outage_shorter_than_the_lease_never_costs_the_attempt(
        tmp_path: Path, params: dict[str, object], monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a job on a worker with a 6 s lease, renewed every 2 s, against a Redis with its AOF on
    ttl = 6.0
    server = RedisServer(appendonly=True, folder=tmp_path / "redis").start()
    monkeypatch.setenv("DEEPE_REDIS_URL", server.url)
    get_settings.cache_clear()
    w = Worker("gpu", tmp_path / "worker.log", env={**FAST, "DEEPE_LEASE_TTL": f"{ttl:g}",
                                                    "DEEPE_REDIS_URL": server.url})
    try:
        w.start()
        job = submit("slow", {**params, "MAX_STEPS": 60})
        wait_for_event(job, EventKind.LOG, count=3)
        # When Redis goes away for almost the whole lease, starting just before a renewal
        renewed_for_ms = wait_just_before_a_renewal(job, ttl / 3)
        server.stop()
        time.sleep(ttl - 0.5)
        server.start()
        # Then the lease, as renewed last, outlives the time since that renewal, and the job
        # rides the outage out: one attempt, never requeued, every step once
        assert renewed_for_ms > (ttl / 3 + ttl) * 1000
        assert job.wait(timeout=180) is JobStatus.SUCCEEDED, job.info()["error"]
        assert job.info()["attempts"] == 1
        kinds = [e.kind for e in events(job)]
        assert EventKind.REQUEUED not in kinds and kinds.count(EventKind.STARTED) == 1
        assert [e.step for e in events(job) if e.kind is EventKind.LOG and "loss" in e.metrics] == list(range(1, 61))
    finally:
        w.stop()
        server.stop()
        monkeypatch.undo()
        get_settings.cache_clear()


HANG_S = 12.0  # longer than the job process's Redis timeouts (5 s), shorter than the lease


def test_a_hung_redis_never_gets_an_event_twice(tmp_path: Path, params: dict[str, object],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from deepe_tasks.core import keys
    from deepe_tasks.core.connection import get_redis

    # Given a job training against a private Redis
    server = RedisServer(folder=tmp_path / "redis").start()
    monkeypatch.setenv("DEEPE_REDIS_URL", server.url)
    get_settings.cache_clear()
    w = Worker("gpu", tmp_path / "worker.log", env={**FAST, "DEEPE_LEASE_TTL": "30", "DEEPE_REDIS_URL": server.url})
    try:
        w.start()
        job = submit("slow", {**params, "MAX_STEPS": 60})
        wait_for_event(job, EventKind.LOG, count=3)
        # When Redis hangs (SIGSTOP) long enough for the publisher's batch to time out on the
        # client and be sent again, then wakes up and runs both copies
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            time.sleep(HANG_S)
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        # Then every step's event is in the stream once, in order, and no entry is repeated
        assert job.wait(timeout=180) is JobStatus.SUCCEEDED, job.info()["error"]
        assert [e.step for e in events(job) if e.kind is EventKind.LOG and "loss" in e.metrics] == list(range(1, 61))
        raw: Any = get_redis().xrange(keys.events(job.id))
        numbered = [(f["a"], f["s"]) for _, f in raw if f["s"] != "0"]
        assert len(numbered) == len(set(numbered))
        assert job.info()["attempts"] == 1
    finally:
        w.stop()
        server.stop()
        monkeypatch.undo()
        get_settings.cache_clear()
