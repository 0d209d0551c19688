"""The reaper's look for queued jobs whose message is nowhere (worker/lost.py), against a real
Redis with no worker on the queue; the fault itself (a reply lost in a cut link) is in
tests/test_partition.py."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import redis

from deepe_tasks import submit
from deepe_tasks.core import keys
from deepe_tasks.core.broker import priority_lists
from deepe_tasks.worker import lost


def ids_in(r: redis.Redis, queue: str) -> list[str]:
    return [json.loads(m)["headers"]["id"] for _, name in priority_lists(queue) for m in r.lrange(name, 0, -1)]


@pytest.fixture
def looks(r: redis.Redis) -> Any:
    """A look now, whatever the spacing of looks (each look holds the lock for a lease)."""
    def look() -> list[str]:
        r.delete(keys.LOST_LOOK)
        return lost.send_lost(r)
    yield look
    r.delete(keys.LOST_LOOK, keys.LOST_SEEN)


def test_a_queued_job_whose_message_vanished_is_sent_again_at_the_second_look(
        r: redis.Redis, sft_params: dict[str, Any], looks: Any) -> None:
    queue = f"lost-{uuid.uuid4().hex[:8]}"
    # Given two queued jobs, one of whose messages vanished (popped, never delivered)
    kept = submit("sft-demo", sft_params, queue=queue)
    gone = submit("sft-demo", sft_params, queue=queue)
    for _, name in priority_lists(queue):
        for message in r.lrange(name, 0, -1):
            if json.loads(message)["headers"]["id"] == gone.id:
                r.lrem(name, 1, str(message))
    assert ids_in(r, queue) == [kept.id]
    # When the reaper looks: the first look only notes it, in case its message was in flight
    assert looks() == [] and gone.id in r.hkeys(keys.LOST_SEEN)
    # Then the second look sends it again; the job with a message is left alone
    assert looks() == [gone.id]
    assert sorted(ids_in(r, queue)) == sorted([kept.id, gone.id])
    assert looks() == [] and r.hlen(keys.LOST_SEEN) == 0
    kept.cancel()
    gone.cancel()


def test_a_message_in_flight_at_one_look_or_delivered_is_not_sent_twice(
        r: redis.Redis, sft_params: dict[str, Any], looks: Any) -> None:
    queue = f"lost-{uuid.uuid4().hex[:8]}"
    job = submit("sft-demo", sft_params, queue=queue)
    name, message = next((n, str(m)) for _, n in priority_lists(queue) for m in r.lrange(n, 0, -1))
    # Given its message popped when the reaper looks (in a consumer's hands, not yet acknowledged)...
    r.lrem(name, 1, message)
    assert looks() == []
    # ...and then in kombu's set of delivered, unacknowledged messages
    tag = uuid.uuid4().hex
    r.hset(keys.KOMBU_UNACKED, tag, json.dumps([json.loads(message), "", queue]))
    try:
        # Then the next looks find it, and send nothing
        assert looks() == [] and looks() == []
        assert ids_in(r, queue) == [] and r.hlen(keys.LOST_SEEN) == 0
        # And a cancelled job without a message is no concern of the look
        r.hdel(keys.KOMBU_UNACKED, tag)
        job.cancel()
        assert looks() == [] and looks() == []
    finally:
        r.hdel(keys.KOMBU_UNACKED, tag)
