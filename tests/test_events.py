"""The event publisher and the stream reader against a real Redis: batching, order, outages,
resends after a lost reply, the memory bound, and fencing.

Faults are made where they happen: `jobstore.append` is wrapped so that a call fails before
or after it reached Redis, as a dropped connection would.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from deepe_tasks.core import jobstore, keys
from deepe_tasks.core.events import BATCH, EventPublisher, read_events
from deepe_tasks.core.records import Event, EventKind, JobRecord, JobStatus

TTL_MS = 60_000


def running_job(r: redis.Redis) -> str:
    """A job claimed by attempt 1, on a queue that no worker consumes."""
    job_id = f"ev-{uuid.uuid4().hex[:10]}"
    record = JobRecord(id=job_id, method="m", method_sha256="sha-" + job_id, params={}, output_dir="/o",
                       queue="events-q")
    jobstore.create(r, record, "SOURCE", Event(kind=EventKind.QUEUED, job=job_id))
    claim = jobstore.claim(r, job_id, "w1", TTL_MS, Event(kind=EventKind.STARTED, job=job_id),
                           worker="w1", started_at=time.time(), pid=1)
    assert claim.record is not None
    return job_id


def logged(r: redis.Redis, job_id: str) -> list[tuple[int, int, int]]:
    """(step, attempt, sequence number) of each `log` event in the stream, in stream order."""
    out = []
    entries: Any = r.xrange(keys.events(job_id))
    for _, fields in entries:
        event = Event.from_json(fields["data"])
        if event.kind is EventKind.LOG:
            out.append((event.step or 0, int(fields["a"]), int(fields["s"])))
    return out


def log_event(job_id: str, step: int) -> Event:
    return Event(kind=EventKind.LOG, job=job_id, step=step, metrics={"loss": 1.0 / step})


class FlakyAppend:
    """`jobstore.append`, failing the way a network does: ``before`` calls fail without reaching
    Redis; ``after`` calls reach Redis and then lose their reply."""

    def __init__(self, real: Callable[..., int], before: int = 0, after: int = 0) -> None:
        self.real, self.before, self.after = real, before, after
        self.calls: list[int] = []  # how many events each call that reached Redis carried

    def __call__(self, client: redis.Redis, job_id: str, attempt: int, chunk: list[tuple[int, str]]) -> int:
        if self.before > 0:
            self.before -= 1
            raise redis.ConnectionError("connection refused (test)")
        answer = self.real(client, job_id, attempt, chunk)
        self.calls.append(len(chunk))
        if self.after > 0:
            self.after -= 1
            raise redis.TimeoutError("reply lost (test)")
        return answer


@pytest.fixture
def flaky(monkeypatch: pytest.MonkeyPatch) -> Callable[..., FlakyAppend]:
    def make(before: int = 0, after: int = 0) -> FlakyAppend:
        wrapper = FlakyAppend(jobstore.append, before, after)
        monkeypatch.setattr("deepe_tasks.core.events.jobstore.append", wrapper)
        return wrapper
    return make


def test_events_arrive_in_order_numbered_and_in_batches(r: redis.Redis, tmp_path: Path,
                                                        flaky: Callable[..., FlakyAppend]) -> None:
    # Given a publisher whose thread batches what gathers while it sends
    job_id = running_job(r)
    counting = flaky()
    publisher = EventPublisher(r, job_id, 1, jsonl=tmp_path / "events.jsonl")
    # When 2,000 events are emitted at once, faster than one round trip each
    for step in range(1, 2001):
        publisher.emit(log_event(job_id, step))
    assert publisher.close(timeout=30)
    # Then all are in the stream once, in order, numbered 1..2000 in the attempt
    assert logged(r, job_id) == [(s, 1, s) for s in range(1, 2001)]
    # in batches of at most BATCH, far fewer calls than events
    assert max(counting.calls) <= BATCH and len(counting.calls) < 100
    # and events.jsonl holds the same events, in the same order
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 2001))


def test_a_batch_whose_reply_was_lost_is_sent_again_and_appended_once(r: redis.Redis,
                                                                      flaky: Callable[..., FlakyAppend]) -> None:
    job_id = running_job(r)
    lossy = flaky(after=2)  # the first two batches reach Redis, their replies do not come back
    publisher = EventPublisher(r, job_id, 1, interval=0.01)
    for step in range(1, 11):
        publisher.emit(log_event(job_id, step))
    assert publisher.close(timeout=30)
    assert len(lossy.calls) >= 3  # the lost ones were sent again
    assert logged(r, job_id) == [(s, 1, s) for s in range(1, 11)]


def test_events_wait_through_an_outage_and_are_sent_in_order_after_it(r: redis.Redis, tmp_path: Path,
                                                                      flaky: Callable[..., FlakyAppend]) -> None:
    job_id = running_job(r)
    flaky(before=4)  # four sends fail: the publisher backs off, keeps the events, tries again
    publisher = EventPublisher(r, job_id, 1, jsonl=tmp_path / "events.jsonl", interval=0.01)
    for step in range(1, 6):
        publisher.emit(log_event(job_id, step))
    assert publisher.close(timeout=30)
    assert logged(r, job_id) == [(s, 1, s) for s in range(1, 6)]


def test_past_its_memory_bound_the_oldest_events_are_only_in_events_jsonl(r: redis.Redis, tmp_path: Path,
                                                                        flaky: Callable[..., FlakyAppend]) -> None:
    job_id = running_job(r)
    flaky(before=1)
    publisher = EventPublisher(r, job_id, 1, jsonl=tmp_path / "events.jsonl", max_buffer=100, interval=0.01)
    for step in range(1, 301):  # all at once: 300 events wait behind the failed send
        publisher.emit(log_event(job_id, step))
    assert publisher.close(timeout=30)
    in_stream = [step for step, _, _ in logged(r, job_id)]
    assert in_stream == list(range(201, 301))  # the newest 100, in order
    assert len((tmp_path / "events.jsonl").read_text().splitlines()) == 300


def test_a_fenced_off_attempt_drops_its_events_and_says_so(r: redis.Redis) -> None:
    # Given attempt 1's lease expired and attempt 2 claimed the job
    job_id = running_job(r)
    r.delete(keys.lease(job_id))
    second = jobstore.claim(r, job_id, "w2", TTL_MS, Event(kind=EventKind.STARTED, job=job_id),
                            worker="w2", started_at=time.time(), pid=2)
    assert second.record is not None and second.record.attempts == 2
    fenced: list[bool] = []
    stale = EventPublisher(r, job_id, 1, on_fenced=lambda: fenced.append(True))
    # When the stale attempt emits
    stale.emit(log_event(job_id, 7))
    # Then nothing of it reaches the stream, and it learns that it was fenced off
    assert not stale.close(timeout=10)
    assert stale.fenced and fenced == [True]
    assert logged(r, job_id) == []
    # while the current attempt's events still go in
    current = EventPublisher(r, job_id, 2)
    current.emit(log_event(job_id, 1))
    assert current.close(timeout=10)
    assert logged(r, job_id) == [(1, 2, 1)]


def test_read_events_replays_then_follows_until_the_final_event(r: redis.Redis) -> None:
    job_id = running_job(r)
    publisher = EventPublisher(r, job_id, 1)
    publisher.emit(log_event(job_id, 1))
    assert publisher.flush(10)
    seen: list[Any] = []
    replay = list(read_events(r, job_id))
    assert [e.kind for e in replay] == [EventKind.QUEUED, EventKind.STARTED, EventKind.LOG]
    # A follower that started after the replay gets what comes next, and stops at the end
    follower = read_events(r, job_id, since=replay[-1].id or "0", follow=True, block_ms=100)
    publisher.emit(log_event(job_id, 2))
    assert publisher.close(10)
    assert jobstore.finish(r, job_id, 1, Event(kind=EventKind.SUCCEEDED, job=job_id), status=JobStatus.SUCCEEDED,
                           error=None, metrics={}, output_dir="/o")
    seen.extend(follower)
    assert [(e.kind, e.step) for e in seen] == [(EventKind.LOG, 2), (EventKind.SUCCEEDED, None)]
