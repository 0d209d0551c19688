"""`queues.overview` against the session's Redis: a running id whose record is gone is skipped,
while a real error (a key of the wrong type, a corrupt record) is not hidden."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis
from pydantic import ValidationError

from deepe_tasks.core import keys
from deepe_tasks.core.records import JobRecord, JobStatus
from deepe_tasks.queue.queues import overview


@pytest.fixture
def running(r: redis.Redis) -> Iterator[list[str]]:
    """Ids this test puts in the running set, with their records; both removed after it."""
    ids: list[str] = []
    yield ids
    for job_id in ids:
        r.srem(keys.RUNNING, job_id)
        r.delete(keys.job(job_id))


def running_record(r: redis.Redis, queue: str) -> str:
    """A running job's record and its entry in the running set, as a claim leaves them."""
    job_id = f"ov-{uuid.uuid4().hex[:10]}"
    record = JobRecord(id=job_id, method="m", method_sha256="sha-" + job_id, params={}, output_dir="/o",
                       queue=queue, status=JobStatus.RUNNING)
    r.hset(keys.job(job_id), mapping=record.to_redis())  # type: ignore[arg-type]
    r.sadd(keys.RUNNING, job_id)
    return job_id


def test_a_running_id_without_a_record_is_skipped(r: redis.Redis, running: list[str]) -> None:
    queue = f"ov-q-{uuid.uuid4().hex[:6]}"
    live = running_record(r, queue)
    ghost = f"ov-ghost-{uuid.uuid4().hex[:6]}"
    running += [live, ghost]
    r.sadd(keys.RUNNING, ghost)  # its record expired after it was listed, or was never written
    infos = {i.name: i for i in overview(r, None)}
    assert infos[queue].running == [live]
    assert all(ghost not in i.running for i in infos.values())


def test_a_key_of_the_wrong_type_is_an_error_not_a_skip(r: redis.Redis, running: list[str]) -> None:
    broken = f"ov-broken-{uuid.uuid4().hex[:6]}"
    running.append(broken)
    r.set(keys.job(broken), "not a hash")
    r.sadd(keys.RUNNING, broken)
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        overview(r, None)


def test_a_corrupt_record_is_an_error_not_a_skip(r: redis.Redis, running: list[str]) -> None:
    corrupt = f"ov-corrupt-{uuid.uuid4().hex[:6]}"
    running.append(corrupt)
    r.hset(keys.job(corrupt), mapping={"id": corrupt, "status": "no-such-status"})
    r.sadd(keys.RUNNING, corrupt)
    with pytest.raises((ValidationError, ValueError)):
        overview(r, None)


def test_redis_down_is_an_error() -> None:
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from deepe_tasks.fixtures.embedded import free_port

    closed = redis.Redis(port=free_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0),
                         decode_responses=True)
    with pytest.raises(redis.ConnectionError):
        overview(closed, None)
