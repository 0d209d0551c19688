"""Every transition of the job state machine against a real Redis, the refused ones included.

Each test narrates one transition: given a job in some state, when an attempt (current or
stale) or the platform asks for a change, then exactly the documented writes happen, or none.
"""

from __future__ import annotations

import time
import uuid

import pytest
import redis

from deepe_tasks.core import jobstore, keys
from deepe_tasks.core.errors import InvalidJobState, JobExists, JobNotFound
from deepe_tasks.core.jobstore import ClaimOutcome, PublishCheck, Renewal, RequeueOutcome
from deepe_tasks.core.records import Event, EventKind, JobRecord, JobStatus
from deepe_tasks.worker import credentials

TTL_MS = 5_000


def new_job(r: redis.Redis) -> str:
    job_id = f"js-{uuid.uuid4().hex[:10]}"
    # On a queue no worker consumes: a reaper of the session's worker must never run these.
    record = JobRecord(id=job_id, method="m", method_sha256="sha-" + job_id, params={"A": 1}, output_dir="/o",
                       queue="jobstore-q")
    jobstore.create(r, record, "SOURCE", Event(kind=EventKind.QUEUED, job=job_id))
    return job_id


def claim(r: redis.Redis, job_id: str, holder: str = "w1") -> jobstore.Claim:
    return jobstore.claim(r, job_id, holder, TTL_MS, Event(kind=EventKind.STARTED, job=job_id, metrics={"pid": 1}),
                          worker=holder, started_at=time.time(), pid=1)


def stream(r: redis.Redis, job_id: str) -> list[tuple[str, dict[str, str]]]:
    return r.xrange(keys.events(job_id))  # type: ignore[return-value]


def kinds(r: redis.Redis, job_id: str) -> list[str]:
    return [Event.from_json(f["data"]).kind.value for _, f in stream(r, job_id)]


def snapshot(r: redis.Redis, job_id: str) -> tuple[object, ...]:
    """Everything a transition may write, to show that a refused one wrote nothing."""
    return (r.hgetall(keys.job(job_id)), stream(r, job_id), r.get(keys.lease(job_id)),
            r.sismember(keys.RUNNING, job_id), r.get(keys.cancel(job_id)))


def test_create_writes_record_index_source_and_first_event_and_refuses_a_taken_id(r: redis.Redis) -> None:
    job_id = new_job(r)
    assert jobstore.get(r, job_id).status is JobStatus.QUEUED
    assert r.zscore(keys.JOBS_INDEX, job_id) is not None
    assert r.get(keys.method_source("sha-" + job_id)) == "SOURCE"
    assert kinds(r, job_id) == ["queued"]
    before = snapshot(r, job_id)
    other = jobstore.get(r, job_id).model_copy(update={"submitted_at": time.time() + 1})  # another submit
    with pytest.raises(JobExists):
        jobstore.create(r, other, "OTHER", Event(kind=EventKind.QUEUED, job=job_id))
    assert snapshot(r, job_id) == before


def test_claim_starts_attempt_one_with_lease_running_set_and_started_event(r: redis.Redis) -> None:
    job_id = new_job(r)
    got = claim(r, job_id)
    assert got.outcome is ClaimOutcome.OK and got.source == "SOURCE"
    assert got.record is not None and got.record.attempts == 1 and got.record.status is JobStatus.RUNNING
    assert r.get(keys.lease(job_id)) == "1:w1" and 0 < r.pttl(keys.lease(job_id)) <= TTL_MS
    assert r.sismember(keys.RUNNING, job_id)
    entry = stream(r, job_id)[-1][1]
    started = Event.from_json(entry["data"])
    assert started.kind is EventKind.STARTED and started.attempt == 1 and started.metrics["attempt"] == 1
    assert (entry["a"], entry["s"]) == ("1", "0")


def test_claim_is_refused_while_leased_and_for_ended_or_missing_jobs(r: redis.Redis) -> None:
    job_id = new_job(r)
    claim(r, job_id, "w1")
    before = snapshot(r, job_id)
    second = claim(r, job_id, "w2")
    assert (second.outcome, second.detail) == (ClaimOutcome.LEASED, "1:w1")
    assert snapshot(r, job_id) == before
    assert claim(r, f"nope-{uuid.uuid4().hex}").outcome is ClaimOutcome.MISSING
    done = new_job(r)
    jobstore.cancel(r, done, save=False)
    before = snapshot(r, done)
    assert (claim(r, done).outcome, claim(r, done).detail) == (ClaimOutcome.ENDED, "cancelled")
    assert snapshot(r, done) == before


def test_a_claim_is_all_or_nothing_when_a_key_it_writes_has_the_wrong_type(r: redis.Redis) -> None:
    # Given a running set that something turned into a list (it must never happen: queue names
    # are validated; this is the last line of defence)
    job_id = new_job(r)
    if r.exists(keys.RUNNING):
        r.rename(keys.RUNNING, f"{keys.RUNNING}:saved")
    r.lpush(keys.RUNNING, "x")
    try:
        before = snapshot_without_running(r, job_id)
        # When a worker claims the job, it is refused and nothing is written
        got = claim(r, job_id)
        assert got.outcome is ClaimOutcome.CORRUPT and "deepe:running is a list" in got.detail
        assert snapshot_without_running(r, job_id) == before
    finally:
        r.delete(keys.RUNNING)
        if r.exists(f"{keys.RUNNING}:saved"):
            r.rename(f"{keys.RUNNING}:saved", keys.RUNNING)


def snapshot_without_running(r: redis.Redis, job_id: str) -> tuple[object, ...]:
    return (r.hgetall(keys.job(job_id)), stream(r, job_id), r.get(keys.lease(job_id)))


def test_a_claim_after_the_lease_expired_fences_off_the_old_attempt(r: redis.Redis) -> None:
    # Given attempt 1 lost its lease (a partition) while its job still reads running
    job_id = new_job(r)
    claim(r, job_id, "w1")
    r.delete(keys.lease(job_id))
    # When a redelivery claims the job
    got = claim(r, job_id, "w2")
    # Then attempt 2 owns it, and every write of attempt 1 is refused
    assert got.record is not None and got.record.attempts == 2
    before = snapshot(r, job_id)
    assert jobstore.renew(r, job_id, 1, "w1", TTL_MS) is Renewal.FENCED
    assert jobstore.append(r, job_id, 1, [(1, "{}")]) == -1
    assert jobstore.check_current(r, job_id, 1, 100) is PublishCheck.FENCED
    final = Event(kind=EventKind.SUCCEEDED, job=job_id)
    assert not jobstore.finish(r, job_id, 1, final, status=JobStatus.SUCCEEDED, error=None, metrics={}, output_dir="/o")
    record = jobstore.get(r, job_id).model_copy(update={"attempts": 1})
    assert jobstore.requeue(r, record, "x", 3, lease_must_be_gone=False) is RequeueOutcome.STALE
    assert not jobstore.set_pid(r, job_id, 1, 99)
    assert snapshot(r, job_id) == before


def test_renew_extends_retakes_an_expired_lease_and_refuses_another_holders(r: redis.Redis) -> None:
    job_id = new_job(r)
    claim(r, job_id, "w1")
    r.pexpire(keys.lease(job_id), 100)
    assert jobstore.renew(r, job_id, 1, "w1", TTL_MS) is Renewal.RENEWED and r.pttl(keys.lease(job_id)) > 1000
    r.delete(keys.lease(job_id))  # expired during an outage, and nobody took the job over
    assert jobstore.renew(r, job_id, 1, "w1", TTL_MS) is Renewal.RETAKEN and r.get(keys.lease(job_id)) == "1:w1"
    r.set(keys.lease(job_id), "1:someone-else")
    assert jobstore.renew(r, job_id, 1, "w1", TTL_MS) is Renewal.FENCED
    assert r.get(keys.lease(job_id)) == "1:someone-else"


def test_append_writes_each_event_once_even_when_a_batch_is_sent_again(r: redis.Redis) -> None:
    job_id = new_job(r)
    claim(r, job_id)
    assert jobstore.append(r, job_id, 1, [(1, '{"kind":"log","job":"j","step":1}'), (2, '{"kind":"log","job":"j","step":2}')]) == 2
    # A client timeout after Redis ran the batch: the same batch again, with one more event
    assert jobstore.append(r, job_id, 1, [(2, '{"kind":"log","job":"j","step":2}'), (3, '{"kind":"log","job":"j","step":3}')]) == 1
    logs = [f for _, f in stream(r, job_id) if f["s"] != "0"]
    assert [f["s"] for f in logs] == ["1", "2", "3"] and {f["a"] for f in logs} == {"1"}


def test_append_is_refused_for_a_job_that_is_not_running(r: redis.Redis) -> None:
    job_id = new_job(r)
    before = snapshot(r, job_id)
    assert jobstore.append(r, job_id, 0, [(1, "{}")]) == -1
    assert snapshot(r, job_id) == before


def test_check_current_needs_the_attempts_lease_with_time_left(r: redis.Redis) -> None:
    job_id = new_job(r)
    claim(r, job_id)
    assert jobstore.check_current(r, job_id, 1, 1000) is PublishCheck.OK
    r.pexpire(keys.lease(job_id), 500)
    assert jobstore.check_current(r, job_id, 1, 1000) is PublishCheck.LEASE_SHORT
    r.delete(keys.lease(job_id))
    assert jobstore.check_current(r, job_id, 1, 1000) is PublishCheck.LEASE_SHORT


def test_finish_writes_record_event_and_frees_lease_and_running_set_once(r: redis.Redis) -> None:
    job_id = new_job(r)
    claim(r, job_id)
    final = Event(kind=EventKind.SUCCEEDED, job=job_id, attempt=1)
    assert jobstore.finish(r, job_id, 1, final, status=JobStatus.SUCCEEDED, error=None, metrics={"loss": 0.5},
                           output_dir="/out")
    record = jobstore.get(r, job_id)
    assert record.status is JobStatus.SUCCEEDED and record.metrics == {"loss": 0.5} and record.output_dir == "/out"
    assert record.finished_at is not None
    assert not r.exists(keys.lease(job_id)) and not r.sismember(keys.RUNNING, job_id)
    assert kinds(r, job_id)[-1] == "succeeded"
    before = snapshot(r, job_id)
    assert not jobstore.finish(r, job_id, 1, final, status=JobStatus.FAILED, error="x", metrics={}, output_dir=None)
    assert snapshot(r, job_id) == before


def test_requeue_by_the_attempt_queues_the_job_and_frees_its_lease(r: redis.Redis) -> None:
    job_id = new_job(r)
    record = claim(r, job_id).record
    assert record is not None
    assert jobstore.requeue(r, record, "the worker shut down", 3, lease_must_be_gone=False) is RequeueOutcome.QUEUED
    assert jobstore.status(r, job_id) is JobStatus.QUEUED
    assert not r.exists(keys.lease(job_id)) and not r.sismember(keys.RUNNING, job_id)
    assert kinds(r, job_id)[-1] == "requeued"
    # The next claim is attempt 2
    assert (claim(r, job_id).record or record).attempts == 2


def test_the_reaper_requeues_only_once_the_lease_is_gone(r: redis.Redis) -> None:
    job_id = new_job(r)
    record = claim(r, job_id).record
    assert record is not None
    before = snapshot(r, job_id)
    assert jobstore.requeue(r, record, "lost", 3, lease_must_be_gone=True) is RequeueOutcome.LEASED
    assert snapshot(r, job_id) == before
    r.delete(keys.lease(job_id))
    assert jobstore.requeue(r, record, "lost", 3, lease_must_be_gone=True) is RequeueOutcome.QUEUED
    # A second reaper, a moment later, gets the same answer and writes nothing; once the job
    # moved on (claimed again), the old token is stale
    before = snapshot(r, job_id)
    assert jobstore.requeue(r, record, "lost", 3, lease_must_be_gone=True) is RequeueOutcome.QUEUED
    assert snapshot(r, job_id) == before
    claim(r, job_id, "w2")
    before = snapshot(r, job_id)
    assert jobstore.requeue(r, record, "lost", 3, lease_must_be_gone=True) is RequeueOutcome.STALE
    assert snapshot(r, job_id) == before


def test_requeue_fails_the_job_past_max_resumes_and_cancels_it_when_a_cancel_waits(r: redis.Redis) -> None:
    job_id = new_job(r)
    record = claim(r, job_id).record
    assert record is not None
    assert jobstore.requeue(r, record, "lost", 0, lease_must_be_gone=False) is RequeueOutcome.FAILED
    failed = jobstore.get(r, job_id)
    assert failed.status is JobStatus.FAILED and "DEEPE_MAX_RESUMES is 0" in (failed.error or "")
    assert kinds(r, job_id)[-1] == "failed" and not r.sismember(keys.RUNNING, job_id)

    other = new_job(r)
    record = claim(r, other).record
    assert record is not None and jobstore.cancel(r, other, save=False) is JobStatus.RUNNING
    assert jobstore.requeue(r, record, "lost", 3, lease_must_be_gone=False) is RequeueOutcome.CANCELLED
    assert jobstore.status(r, other) is JobStatus.CANCELLED and kinds(r, other)[-1] == "cancelled"


def test_a_cancel_that_saves_is_requeued_so_the_next_attempt_saves(r: redis.Redis) -> None:
    job_id = new_job(r)
    record = claim(r, job_id).record
    assert record is not None
    jobstore.cancel(r, job_id, save=True)
    assert jobstore.requeue(r, record, "lost", 3, lease_must_be_gone=False) is RequeueOutcome.QUEUED
    assert r.get(keys.cancel(job_id)) == "save"


def test_a_queued_job_stays_in_the_unsent_set_until_its_message_is_sent(r: redis.Redis) -> None:
    # Given a job just created (its message not sent yet), and one requeued
    job_id = new_job(r)
    assert job_id in jobstore.unsent(r, before=time.time() + 1)
    jobstore.sent(r, job_id)
    assert job_id not in jobstore.unsent(r, before=time.time() + 1)
    record = claim(r, job_id).record
    assert record is not None
    jobstore.requeue(r, record, "x", 3, lease_must_be_gone=False)
    # Then the requeued job waits in the unsent set, and a claim (of a message sent at last) takes it out
    assert job_id in jobstore.unsent(r, before=time.time() + 1)
    claim(r, job_id)
    assert job_id not in jobstore.unsent(r, before=time.time() + 1)


def test_every_transition_sent_again_after_a_lost_reply_gets_the_same_answer(r: redis.Redis) -> None:
    # A reply lost to a timeout makes the caller (or redis-py) send the same step again.
    job_id = new_job(r)
    record = jobstore.get(r, job_id)
    jobstore.create(r, record, "SOURCE", Event(kind=EventKind.QUEUED, job=job_id))  # no JobExists
    first = claim(r, job_id, "w1")
    again = claim(r, job_id, "w1")
    assert again.outcome is ClaimOutcome.OK and again.record == first.record and again.source == "SOURCE"
    assert jobstore.get(r, job_id).attempts == 1 and kinds(r, job_id).count("started") == 1
    assert first.record is not None
    assert jobstore.requeue(r, first.record, "x", 3, lease_must_be_gone=False) is RequeueOutcome.QUEUED
    before = snapshot(r, job_id)
    assert jobstore.requeue(r, first.record, "x", 3, lease_must_be_gone=False) is RequeueOutcome.QUEUED
    assert snapshot(r, job_id) == before
    claim(r, job_id, "w2")
    final = Event(kind=EventKind.SUCCEEDED, job=job_id)
    assert jobstore.finish(r, job_id, 2, final, status=JobStatus.SUCCEEDED, error=None, metrics={}, output_dir="/o")
    before = snapshot(r, job_id)
    assert jobstore.finish(r, job_id, 2, final, status=JobStatus.SUCCEEDED, error=None, metrics={}, output_dir="/o")
    assert snapshot(r, job_id) == before
    # but never for another token
    assert not jobstore.finish(r, job_id, 1, final, status=JobStatus.SUCCEEDED, error=None, metrics={}, output_dir="/o")


def test_cancel_of_a_queued_job_ends_it_and_of_a_final_one_is_refused(r: redis.Redis) -> None:
    job_id = new_job(r)
    assert jobstore.cancel(r, job_id, save=False) is JobStatus.CANCELLED
    record = jobstore.get(r, job_id)
    assert record.status is JobStatus.CANCELLED and record.error == "cancelled before it started"
    assert kinds(r, job_id) == ["queued", "cancelled"]
    before = snapshot(r, job_id)
    with pytest.raises(InvalidJobState, match="already cancelled"):
        jobstore.cancel(r, job_id, save=True)
    assert snapshot(r, job_id) == before
    with pytest.raises(JobNotFound):
        jobstore.cancel(r, f"nope-{uuid.uuid4().hex}", save=False)


def test_fail_queued_only_fails_a_queued_job(r: redis.Redis) -> None:
    job_id = new_job(r)
    assert jobstore.fail_queued(r, job_id, "could not be queued")
    assert jobstore.get(r, job_id).status is JobStatus.FAILED and kinds(r, job_id)[-1] == "failed"
    running = new_job(r)
    claim(r, running)
    before = snapshot(r, running)
    assert not jobstore.fail_queued(r, running, "x")
    assert snapshot(r, running) == before


def test_forget_running_keeps_a_running_job_in_the_running_set(r: redis.Redis) -> None:
    job_id = new_job(r)
    claim(r, job_id)
    assert not jobstore.forget_running(r, job_id) and r.sismember(keys.RUNNING, job_id)
    r.sadd(keys.RUNNING, "ghost-job")
    assert jobstore.forget_running(r, "ghost-job") and not r.sismember(keys.RUNNING, "ghost-job")


def test_a_stream_broken_by_a_method_does_not_stop_the_state_from_changing(r: redis.Redis) -> None:
    # Given a method that appended an entry with the highest possible id to its own stream
    job_id = new_job(r)
    claim(r, job_id)
    r.xadd(keys.events(job_id), {"data": "{}"}, id="18446744073709551615-18446744073709551615")
    # When the attempt finishes, the record still changes (the final event cannot be appended)
    final = Event(kind=EventKind.SUCCEEDED, job=job_id)
    assert jobstore.finish(r, job_id, 1, final, status=JobStatus.SUCCEEDED, error=None, metrics={}, output_dir="/o")
    assert jobstore.status(r, job_id) is JobStatus.SUCCEEDED


def needs_redis_7(r: redis.Redis) -> None:
    version = str(r.info("server")["redis_version"])
    if int(version.split(".")[0]) < 7:
        pytest.skip(f"a job's own Redis user needs Redis 7 (read-only key rules); this one is {version}")


def test_an_attempts_redis_user_reaches_only_its_own_jobs_keys(r: redis.Redis, redis_url: str) -> None:
    needs_redis_7(r)
    job_id, other = new_job(r), new_job(r)
    claim(r, job_id)
    claim(r, other)
    credential = credentials.AttemptCredential(r, redis_url, job_id, 1)
    given = credential.create()
    assert credential.scoped and given.username and ":@" not in given.url
    job = redis.Redis.from_url(given.url, username=given.username, password=given.password, decode_responses=True)
    try:
        # What the job process does: append its events, check it may publish, read its cancel flag
        assert jobstore.append(job, job_id, 1, [(1, "{}")]) == 1
        assert jobstore.check_current(job, job_id, 1, 100) is PublishCheck.OK
        assert job.get(keys.cancel(job_id)) is None
        # What it may not: write its record or lease, touch another job, or read the cluster's keys
        for attempt in (lambda: job.hset(keys.job(job_id), "status", "succeeded"),
                        lambda: job.set(keys.lease(job_id), "x"),
                        lambda: job.xadd(keys.job(job_id), {"x": "1"}),
                        lambda: jobstore.append(job, other, 1, [(1, "{}")]),
                        lambda: job.hgetall(keys.job(other)),
                        lambda: job.smembers(keys.RUNNING),
                        lambda: job.lpush("gpu", "x"),
                        lambda: job.eval("return redis.call('hset', ARGV[1], 'status', 'x')", 0, keys.job(job_id)),
                        lambda: job.eval("while true do end", 0),
                        lambda: job.script_load("return 1"),
                        lambda: job.acl_list(),
                        lambda: job.config_get("requirepass")):
            with pytest.raises(redis.ResponseError, match="permission|can.t run"):
                attempt()
        assert jobstore.get(r, job_id).status is JobStatus.RUNNING
        # When the attempt ends, its user and its connections are gone
        credential.delete()
        with pytest.raises(redis.exceptions.AuthenticationError):
            job.ping()
    finally:
        job.close()


def test_readers_skip_stream_entries_that_are_not_deepe_events(r: redis.Redis) -> None:
    from deepe_tasks.core.events import read_events

    # Given a job whose method appended entries of its own to the job's stream
    job_id = new_job(r)
    claim(r, job_id)
    r.xadd(keys.events(job_id), {"x": "1"})
    r.xadd(keys.events(job_id), {"data": "not json"})
    jobstore.append(r, job_id, 1, [(1, Event(kind=EventKind.LOG, job=job_id, step=1).to_json())])
    r.xadd(keys.events(job_id), {"data": "{}"})
    final = Event(kind=EventKind.SUCCEEDED, job=job_id)
    jobstore.finish(r, job_id, 1, final, status=JobStatus.SUCCEEDED, error=None, metrics={}, output_dir="/o")
    # Then a replay and a follow read the deepe events only, and reach the end
    assert [e.kind.value for e in read_events(r, job_id)] == ["queued", "started", "log", "succeeded"]
    assert [e.kind.value for e in read_events(r, job_id, follow=True)][-1] == "succeeded"


def test_the_reaper_sends_the_message_of_a_job_queued_without_one(r: redis.Redis) -> None:
    from deepe_tasks.worker.lifecycle import UNSENT_GRACE, send_unsent

    # Given a job recorded a while ago by a client that died before it sent the message
    job_id = f"js-{uuid.uuid4().hex[:10]}"
    queue = f"unsent-{uuid.uuid4().hex[:6]}"
    record = JobRecord(id=job_id, method="m", method_sha256="x", params={}, output_dir="/o", queue=queue,
                       submitted_at=time.time() - UNSENT_GRACE - 5)
    jobstore.create(r, record, "SOURCE", Event(kind=EventKind.QUEUED, job=job_id))
    waiting = [queue] + [f"{queue}:{p}" for p in range(1, 10)]
    assert sum(r.llen(q) for q in waiting) == 0
    # When a reaper makes its round
    assert job_id in send_unsent(r)
    # Then the job's one message is on its queue, and the job left the unsent set
    assert sum(r.llen(q) for q in waiting) == 1
    assert job_id not in jobstore.unsent(r, before=time.time() + 1)
    assert job_id not in send_unsent(r)
