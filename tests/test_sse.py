"""`GET /jobs/{id}/events` keeps a quiet stream alive: the in-process API app on the session's Redis.

A proxy closes a connection that carries nothing for a while (nginx: 60 s), so a job that is
quiet for long (a queued one, a long data load) gets an SSE comment every `SSE_KEEPALIVE`
seconds; here that is lowered to a fraction of a second.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from deepe_tasks.core import jobstore
from deepe_tasks.core.events import read_events, tail_events
from deepe_tasks.core.records import Event, EventKind, JobRecord, JobStatus
from deepe_tasks.ui import api

KEEPALIVE = 0.3
SLACK = 2.0  # what a loaded machine may add to a wait


@pytest.fixture(autouse=True)
def short_keepalive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api, "SSE_KEEPALIVE", KEEPALIVE)


def queued_job(r: redis.Redis) -> str:
    """A queued job on a queue that no worker consumes: nothing happens to it unless the test acts."""
    job_id = f"sse-{uuid.uuid4().hex[:10]}"
    record = JobRecord(id=job_id, method="m", method_sha256="sha-" + job_id, params={}, output_dir="/o",
                       queue="sse-q")
    jobstore.create(r, record, "SOURCE", Event(kind=EventKind.QUEUED, job=job_id))
    return job_id


def claim(r: redis.Redis, job_id: str) -> None:
    result = jobstore.claim(r, job_id, "w1", 60_000, Event(kind=EventKind.STARTED, job=job_id),
                            worker="w1", started_at=time.time(), pid=1)
    assert result.record is not None


def finish(r: redis.Redis, job_id: str) -> None:
    assert jobstore.finish(r, job_id, 1, Event(kind=EventKind.SUCCEEDED, job=job_id), status=JobStatus.SUCCEEDED,
                           error=None, metrics={}, output_dir="/o")


class Stream:
    """An SSE response read on a thread: each message as (arrival time, {field: value}), a comment
    as {"comment": text}, and None once the response has ended."""

    def __init__(self, http: TestClient, path: str, headers: dict[str, str] | None = None) -> None:
        self.messages: queue.Queue[tuple[float, dict[str, Any] | None]] = queue.Queue()
        self._http, self._path, self._headers = http, path, headers or {}
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            with self._http.stream("GET", self._path, headers=self._headers) as response:
                assert response.status_code == 200, response.read()
                assert response.headers["content-type"].startswith("text/event-stream")
                current: dict[str, Any] = {}
                for line in response.iter_lines():
                    if not line:
                        if current:
                            self.messages.put((time.monotonic(), current))
                            current = {}
                        continue
                    field, _, value = line.partition(":")
                    value = value.removeprefix(" ")
                    current["comment" if field == "" else field] = json.loads(value) if field == "data" else value
        finally:
            self.messages.put((time.monotonic(), None))

    def next(self, timeout: float) -> tuple[float, dict[str, Any] | None]:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"nothing on the stream within {timeout} s") from None

    def join(self) -> None:
        self._thread.join(timeout=10)
        assert not self._thread.is_alive()


def test_a_quiet_job_gets_keepalives_then_its_events_and_the_stream_ends_with_it(
        http: TestClient, r: redis.Redis) -> None:
    job_id = queued_job(r)
    stream = Stream(http, f"/jobs/{job_id}/events")
    # Given the replay of a queued job that nothing happens to
    at, first = stream.next(SLACK + 5)
    assert first is not None and first["event"] == "queued"
    # Then a keepalive comes once the interval has passed, and again for each quiet interval
    for _ in range(2):
        t, message = stream.next(KEEPALIVE + SLACK)
        assert message == {"comment": "keepalive"}
        assert t - at >= KEEPALIVE * 0.9
        at = t
    # When the job starts, its event still arrives, at once
    claim(r, job_id)
    sent = time.monotonic()
    while (message := stream.next(KEEPALIVE + SLACK)[1]) == {"comment": "keepalive"}:
        pass
    assert message is not None and message["event"] == "started" and message["data"]["job"] == job_id
    assert time.monotonic() - sent < SLACK
    # and when it ends, its final event closes the stream at once
    finish(r, job_id)
    sent = time.monotonic()
    while (message := stream.next(KEEPALIVE + SLACK)[1]) == {"comment": "keepalive"}:
        pass
    assert message is not None and message["event"] == "succeeded"
    t, end = stream.next(SLACK)
    assert end is None and t - sent < SLACK
    stream.join()


def test_the_stream_of_an_ended_job_ends_promptly(http: TestClient, r: redis.Redis) -> None:
    job_id = queued_job(r)
    claim(r, job_id)
    finish(r, job_id)
    started = time.monotonic()
    whole = Stream(http, f"/jobs/{job_id}/events")
    kinds = []
    while (message := whole.next(SLACK + 5)[1]) is not None:
        kinds.append(message.get("event", message.get("comment")))
    assert kinds == ["queued", "started", "succeeded"]
    whole.join()
    # A client that reconnects after the final event gets nothing more, and no wait of a keepalive
    last = [e.id for e in read_events(r, job_id)][-1]
    assert last is not None
    again = Stream(http, f"/jobs/{job_id}/events", headers={"Last-Event-ID": last})
    assert again.next(SLACK + 2)[1] is None
    again.join()
    assert time.monotonic() - started < 2 * SLACK + 2


def test_python_readers_never_see_a_keepalive(r: redis.Redis) -> None:
    # Given a follower of a quiet job, and the same with keepalive ticks
    job_id = queued_job(r)
    plain = read_events(r, job_id, follow=True, block_ms=100)
    ticking = tail_events(r, job_id, follow=True, block_ms=100, idle=0.2)
    assert next(plain).kind is EventKind.QUEUED and next(ticking).kind is EventKind.QUEUED  # type: ignore[union-attr]
    assert next(ticking) is None  # a tick, after a quiet 0.2 s
    def claim_and_finish() -> None:
        claim(r, job_id)
        finish(r, job_id)

    finish_later = threading.Timer(0.5, claim_and_finish)
    finish_later.start()
    # Then the plain reader gets only the events, and both end with the job
    assert [e.kind for e in plain] == [EventKind.STARTED, EventKind.SUCCEEDED]
    rest = list(ticking)
    assert [e.kind for e in rest if e is not None] == [EventKind.STARTED, EventKind.SUCCEEDED]
    finish_later.join()
