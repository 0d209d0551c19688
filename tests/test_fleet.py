"""Fleet scale: retention, costs that do not grow with history, and workers that scale in cleanly.

Each test runs against a Redis of its own (a real redis-server), so that it can count what
Redis did and let keys expire without touching the other tests' jobs.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from deepe_tasks.core import jobstore, keys
from deepe_tasks.core.errors import JobNotFound
from deepe_tasks.core.records import Event, EventKind, JobRecord, JobStatus
from deepe_tasks.core.settings import get_settings
from deepe_tasks.queue.client import Job
from tests.helpers import Worker, cli_here, wait_for


@pytest.fixture
def own_redis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[redis.Redis]:
    """A private Redis that deepe's settings point at for this test (retention: 5 s)."""
    from deepe_tasks.fixtures.embedded import RedisServer

    server = RedisServer(folder=tmp_path / "redis").start()
    monkeypatch.setenv("DEEPE_REDIS_URL", server.url)
    monkeypatch.setenv("DEEPE_JOB_RETENTION", "5")
    get_settings.cache_clear()
    client = redis.Redis.from_url(server.url, decode_responses=True)
    try:
        yield client
    finally:
        client.close()
        server.stop()
        monkeypatch.undo()
        get_settings.cache_clear()


def create(r: redis.Redis, method: str = "fleet-m", queue: str = "fleet-q", sha: str = "sha-fleet") -> str:
    job_id = f"fl-{uuid.uuid4().hex[:12]}"
    record = JobRecord(id=job_id, method=method, method_sha256=sha, params={"A": 1}, output_dir="/o", queue=queue)
    jobstore.create(r, record, "SOURCE", Event(kind=EventKind.QUEUED, job=job_id))
    return job_id


def claim(r: redis.Redis, job_id: str) -> JobRecord:
    got = jobstore.claim(r, job_id, "w1", 60_000, Event(kind=EventKind.STARTED, job=job_id), worker="w1",
                         started_at=time.time() - 90, pid=1)
    assert got.record is not None, got
    return got.record


def succeed(r: redis.Redis, job_id: str) -> None:
    record = claim(r, job_id)
    for step in range(1, 4):  # a few progress events, as a trainer writes them
        jobstore.append(r, job_id, record.attempts, [(step, Event(kind=EventKind.LOG, job=job_id, step=step,
                                                                  metrics={"loss": 1.0 / step}).to_json())])
    final = Event(kind=EventKind.SUCCEEDED, job=job_id)
    assert jobstore.finish(r, job_id, record.attempts, final, status=JobStatus.SUCCEEDED, error=None, metrics={},
                           output_dir="/o")


def job_keys(job_id: str) -> list[str]:
    return [keys.job(job_id), keys.events(job_id), keys.cancel(job_id)]


def indexed(r: redis.Redis, job_id: str) -> bool:
    pipe = r.pipeline()
    pipe.zscore(keys.JOBS_INDEX, job_id)
    pipe.zscore(keys.IDS, job_id)
    pipe.zscore(keys.by_method("fleet-m"), job_id)
    for state in JobStatus:
        pipe.zscore(keys.by_status(state.value), job_id)
    return any(v is not None for v in pipe.execute())


# Slow tier: these wait for keys to expire, or write 5,000 jobs.
@pytest.mark.e2e
def test_an_ended_job_expires_with_its_index_entries_and_answers_unknown_or_expired(
        own_redis: redis.Redis, http: TestClient) -> None:
    r = own_redis
    # Given jobs that ended in each way, and one that runs, all with DEEPE_JOB_RETENTION=5
    succeeded, cancelled, unsent, lost, running = (create(r) for _ in range(5))
    succeed(r, succeeded)
    jobstore.cancel(r, cancelled, save=False)
    jobstore.fail_queued(r, unsent, "the broker was away")
    assert jobstore.requeue(r, claim(r, lost), "lost", 0, lease_must_be_gone=False) is jobstore.RequeueOutcome.FAILED
    claim(r, running)
    ended = [succeeded, cancelled, unsent, lost]
    # Then each ended job's keys expire within the retention, and the running job's never do
    for job_id in ended:
        assert 0 < r.ttl(keys.job(job_id)) <= 5 and 0 < r.ttl(keys.events(job_id)) <= 5
    assert r.ttl(keys.job(running)) == -1 and r.ttl(keys.events(running)) == -1
    # The pinned source stays while a job that runs it has not ended
    assert r.ttl(keys.method_source("sha-fleet")) == -1
    assert r.hget(keys.STATS, "finished:succeeded") == "1" and r.hget(keys.STATS, "finished:failed") == "2"

    wait_for(lambda: not any(r.exists(k) for j in ended for k in job_keys(j)), timeout=15)
    assert jobstore.prune(r) == 4  # the reaper's round (and every transition that ends a job) does this
    assert not any(indexed(r, j) for j in ended) and indexed(r, running)
    assert jobstore.status(r, running) is JobStatus.RUNNING

    # When someone asks for an expired job, the answer says it may have expired
    with pytest.raises(JobNotFound, match="expired"):
        Job(succeeded).status()
    answer = http.get(f"/jobs/{succeeded}")
    assert answer.status_code == 404 and "DEEPE_JOB_RETENTION (5 s)" in answer.json()["detail"]
    shown = cli_here("status", succeeded)
    assert shown.returncode == 2 and "expired" in shown.stderr
    listed = http.get("/jobs").json()["jobs"]
    assert [j["id"] for j in listed] == [running]

    # And once the last job of that source ends, the source expires with it
    record = jobstore.get(r, running)
    jobstore.finish(r, running, record.attempts, Event(kind=EventKind.FAILED, job=running), status=JobStatus.FAILED,
                    error="x", metrics={}, output_dir=None)
    assert 0 < r.ttl(keys.method_source("sha-fleet")) <= 5


@pytest.mark.e2e
def test_the_same_id_submitted_again_after_it_expired_stays_listed(own_redis: redis.Redis) -> None:
    r = own_redis
    job_id = create(r)
    jobstore.cancel(r, job_id, save=False)
    wait_for(lambda: not r.exists(keys.job(job_id)), timeout=15)
    again = JobRecord(id=job_id, method="fleet-m", method_sha256="sha-fleet", params={}, output_dir="/o",
                      queue="fleet-q")
    jobstore.create(r, again, "SOURCE", Event(kind=EventKind.QUEUED, job=job_id))
    jobstore.prune(r)
    assert r.zscore(keys.JOBS_INDEX, job_id) is not None and r.zscore(keys.by_status("queued"), job_id) is not None


def test_a_long_jobs_stream_is_bounded_and_an_ended_one_trimmed_further(own_redis: redis.Redis) -> None:
    from deepe_tasks.core.lua import ENDED_STREAM_MAXLEN, STREAM_MAXLEN

    r = own_redis
    job_id = create(r)
    record = claim(r, job_id)
    events = [Event(kind=EventKind.LOG, job=job_id, step=s).to_json() for s in range(1, 3 * STREAM_MAXLEN + 1)]
    for start in range(0, len(events), 500):
        batch = [(start + i + 1, e) for i, e in enumerate(events[start:start + 500])]
        jobstore.append(r, job_id, record.attempts, batch)
    # Approximate trimming (MAXLEN ~) keeps a little more than the bound, never the whole history
    assert STREAM_MAXLEN <= r.xlen(keys.events(job_id)) < 1.5 * STREAM_MAXLEN
    assert Job(job_id).progress().step == 3 * STREAM_MAXLEN  # type: ignore[union-attr]
    jobstore.finish(r, job_id, record.attempts, Event(kind=EventKind.SUCCEEDED, job=job_id),
                    status=JobStatus.SUCCEEDED, error=None, metrics={}, output_dir="/o")
    assert r.xlen(keys.events(job_id)) < 1.5 * ENDED_STREAM_MAXLEN
    # Every event counts in deepe_events_published, trimmed or not
    assert int(r.hget(keys.STATS, "events") or 0) == 3 * STREAM_MAXLEN + 3  # + queued, started, succeeded


def test_a_preemption_uses_up_no_resume_and_a_loss_does(own_redis: redis.Redis) -> None:
    r = own_redis
    job_id = create(r)
    # Preempted (SIGTERM: checkpointed and requeued) more often than DEEPE_MAX_RESUMES=1 allows losses
    for _ in range(3):
        outcome = jobstore.requeue(r, claim(r, job_id), "the worker shut down", 1, lease_must_be_gone=False,
                                   preempted=True)
        assert outcome is jobstore.RequeueOutcome.QUEUED
    assert jobstore.get(r, job_id).losses == 0
    # Lost twice (a kill, a cut-off): the second loss is past DEEPE_MAX_RESUMES=1
    assert jobstore.requeue(r, claim(r, job_id), "lost", 1, lease_must_be_gone=False) is jobstore.RequeueOutcome.QUEUED
    assert jobstore.requeue(r, claim(r, job_id), "lost", 1, lease_must_be_gone=False) is jobstore.RequeueOutcome.FAILED
    record = jobstore.get(r, job_id)
    assert record.losses == 2 and record.attempts == 5
    assert "lost its worker 2 times" in (record.error or "") and "Preemptions" in (record.error or "")


def commands(r: redis.Redis) -> dict[str, int]:
    """Redis's count of calls by command (those that scripts make included)."""
    stats: Any = r.info("commandstats")
    return {name: int(v["calls"]) for name, v in stats.items()}


# A connection's own set-up and health checks, and INFO itself: not the reads' cost.
CONNECTION = {"cmdstat_info", "cmdstat_hello", "cmdstat_ping", "cmdstat_select", "cmdstat_auth"}


def cost(r: redis.Redis, action: Any) -> dict[str, int]:
    """The commands that Redis ran for ``action``, by name."""
    before = commands(r)
    action()
    after = commands(r)
    return {k: v - before.get(k, 0) for k, v in after.items()
            if v != before.get(k, 0) and k not in CONNECTION and not k.startswith("cmdstat_client|")}


@pytest.mark.e2e
def test_metrics_and_job_lists_cost_the_same_with_100_or_5000_ended_jobs(
        own_redis: redis.Redis, http: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    # Kept for the whole test: writing 5,000 jobs may take longer than the fixture's 5 s, and
    # pruning what expired meanwhile would be work of its own (bounded, but not the reads' cost)
    monkeypatch.setenv("DEEPE_JOB_RETENTION", "3600")
    get_settings.cache_clear()
    r = own_redis
    running = [create(r) for _ in range(3)]
    for job_id in running:
        claim(r, job_id)
    waiting = [create(r) for _ in range(2)]

    def add_ended(n: int) -> None:
        for _ in range(n):
            succeed(r, create(r))

    reads = {
        "/metrics": lambda: http.get("/metrics"),
        "GET /jobs": lambda: http.get("/jobs", params={"limit": 50}),
        "GET /jobs?status=running": lambda: http.get("/jobs", params={"status": "running"}),
        "GET /jobs?method": lambda: http.get("/jobs", params={"method": "fleet-m", "status": "queued"}),
        "deepe jobs": lambda: cli_here("jobs", "--limit", "50"),
    }
    add_ended(100)
    for read in reads.values():  # once first: Redis loads each script on its first use
        read()
    small = {name: cost(r, read) for name, read in reads.items()}
    add_ended(4900)
    large = {name: cost(r, read) for name, read in reads.items()}
    assert large == small  # the same commands, the same number of each: nothing grows with history
    assert not {"cmdstat_keys", "cmdstat_scan", "cmdstat_zscan"} & {k for c in large.values() for k in c}

    # And the figures are right
    families = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}
    by_state = {s.labels["state"]: s.value for s in families["deepe_jobs"].samples}
    assert by_state == {"queued": 2, "running": 3, "succeeded": 5000, "failed": 0, "cancelled": 0}
    finished = {s.labels["state"]: s.value for s in families["deepe_jobs_finished"].samples
                if s.name.endswith("_total")}
    assert finished["succeeded"] == 5000
    histogram = {s.labels.get("le"): s.value for s in families["deepe_job_duration_seconds"].samples
                 if s.name.endswith("_bucket")}
    assert histogram["60.0"] == 0 and histogram["300.0"] == 5000 == histogram["+Inf"]  # each ran ~90 s
    page = http.get("/jobs", params={"status": "running"}).json()
    assert sorted(j["id"] for j in page["jobs"]) == sorted(running) and page["next_cursor"] is None
    queued = http.get("/jobs", params={"method": "fleet-m", "status": "queued"}).json()["jobs"]
    assert sorted(j["id"] for j in queued) == sorted(waiting)


def test_job_pages_walk_the_whole_history_newest_first(own_redis: redis.Redis, http: TestClient) -> None:
    r = own_redis
    ids = [create(r) for _ in range(25)]
    for job_id in ids[::2]:
        jobstore.cancel(r, job_id, save=False)
    seen: list[str] = []
    cursor = None
    while True:
        page = http.get("/jobs", params={"limit": 4, "status": "cancelled", **({"cursor": cursor} if cursor else {})})
        seen += [j["id"] for j in page.json()["jobs"]]
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::2][::-1]
    refused = http.get("/jobs", params={"method": "../x"})
    assert refused.status_code == 422 and "is not a method name" in refused.json()["detail"]


def test_job_ids_are_found_by_a_prefix_without_a_scan(own_redis: redis.Redis) -> None:
    from deepe_tasks.queue.client import find_job

    r = own_redis
    job_id = create(r)
    assert find_job(job_id[:8]).id == job_id
    spent = cost(r, lambda: find_job(job_id[:8]))
    assert "cmdstat_zscan" not in spent and "cmdstat_scan" not in spent


# -- workers that KEDA can scale in -------------------------------------------------------------

def test_a_one_job_worker_exits_after_its_job_and_an_idle_one_after_the_idle_time(
        workers: list[Worker], tmp_path: Path, sft_params: dict[str, object]) -> None:
    from deepe_tasks import submit

    one = Worker("one-job-q", tmp_path / "one.log", extra_args=["--one-job"],
                 env={"DEEPE_JOB_RETENTION": "600"}).start()
    workers.append(one)
    job = submit("sft-demo", {**sft_params, "MAX_STEPS": 2}, queue="one-job-q")
    assert job.wait(timeout=180) is JobStatus.SUCCEEDED
    assert one.process.proc is not None and one.process.proc.wait(timeout=60) == 0
    # The job's message was acknowledged: nothing of it waits to be run again
    assert job.status() is JobStatus.SUCCEEDED and job.record().attempts == 1
    # The worker's DEEPE_JOB_RETENTION set the expiry of the record and of Celery's result
    r = redis.Redis.from_url(get_settings().redis_url, decode_responses=True)
    assert 0 < r.ttl(keys.job(job.id)) <= 600 and 0 < r.ttl(f"celery-task-meta-{job.id}") <= 600
    r.close()

    idle = Worker("idle-q", tmp_path / "idle.log", extra_args=["--idle-exit", "3"]).start()
    workers.append(idle)
    started = time.monotonic()
    assert idle.process.proc is not None and idle.process.proc.wait(timeout=60) == 0
    assert time.monotonic() - started >= 2 and "no job for 3 s" in idle.log()


def test_the_large_fleet_profile_turns_off_gossip_and_mingle_and_slows_heartbeats_and_polls() -> None:
    from deepe_tasks.core.broker import make_app, worker_flags
    from deepe_tasks.core.settings import Settings

    assert worker_flags(Settings(fleet="small")) == []
    assert worker_flags(Settings(fleet="large")) == ["--without-gossip", "--without-mingle", "--heartbeat-interval", "10"]
    assert make_app(Settings(fleet="large")).conf.broker_transport_options["polling_interval"] == 10
    assert "polling_interval" not in make_app(Settings(fleet="small")).conf.broker_transport_options


def test_a_large_fleet_worker_answers_pings_and_flower_sees_it_online(workers: list[Worker], tmp_path: Path) -> None:
    from deepe_tasks.core.broker import app_for

    w = Worker("large-q", tmp_path / "large.log", env={"DEEPE_FLEET": "large"}).start()  # start() pings it
    workers.append(w)
    app = app_for(get_settings().redis_url)
    state = app.events.State()
    heartbeats: list[dict[str, Any]] = []

    def on_event(event: dict[str, Any]) -> None:
        state.event(event)
        if event.get("type") == "worker-heartbeat" and event.get("hostname") == w.hostname:
            heartbeats.append(event)

    # What Flower does: receive the workers' events into a State, on a thread of its own
    conn = app.connection()
    receiver = app.events.Receiver(conn, handlers={"*": on_event})
    threading.Thread(target=receiver.capture, kwargs={"limit": None, "timeout": None, "wakeup": True},
                     daemon=True).start()
    try:
        # A receiver that starts asks every worker for a heartbeat, and Celery answers that one
        # with freq=5 whatever the interval: the worker's own heartbeats say freq=10.
        wait_for(lambda: any(h["freq"] == 10.0 for h in heartbeats), timeout=45)
    finally:
        receiver.should_stop = True
    assert {h["freq"] for h in heartbeats} <= {5.0, 10.0}  # never Celery's default of 2 s
    assert state.workers[w.hostname].alive
    assert "mingle" not in w.log()  # a default worker logs "mingle: searching for neighbors" at start
