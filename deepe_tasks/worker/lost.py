"""Queued jobs whose message is nowhere: sent again.

kombu's Redis transport takes a message with BRPOP, which removes it from the list as Redis
replies. A reply lost on its way (the consumer's host cut off until Redis drops the
connection; Redis killed between its AOF write and the reply) loses the message with no trace
in kombu's unacknowledged set: the job stays queued, and no worker will ever see it.

Each look (by one worker, at most once per DEEPE_LEASE_TTL) takes the queued jobs whose message
was sent (not in ``deepe:unsent``) and finds each one's message in its queue's lists or among
the delivered, unacknowledged ones. A job found in neither at two looks in a row is sent again.
A message in flight at one look (popped, not yet in the unacknowledged set) is found at the
next; a job sent twice still runs once (the claim takes it; the other message is dropped).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import redis

from deepe_tasks.core import broker, jobstore, keys
from deepe_tasks.core.errors import JobNotFound
from deepe_tasks.core.records import JobStatus
from deepe_tasks.core.settings import get_settings

log = logging.getLogger(__name__)

# The oldest queued jobs looked at per look: bounds its cost on a deep backlog (where a lost
# message is among the oldest waiting ones, as a job's wait grows from its submit on).
MAX_LOOKED_AT = 5000


def _message_ids(raw: list[Any]) -> set[str]:
    ids = set()
    for message in raw:
        try:
            decoded = json.loads(message)
            # a queue list holds the message; kombu's unacknowledged hash holds [message, exchange, key]
            headers = (decoded[0] if isinstance(decoded, list) else decoded)["headers"]
            ids.add(str(headers["id"]))
        except (ValueError, TypeError, KeyError, IndexError):
            continue  # not a deepe task's message
    return ids


def _queued_with_message_sent(client: redis.Redis) -> dict[str, str]:
    """Queued job → the Celery queue its message went to, for the jobs whose message was sent."""
    ids = [str(i) for i in client.zrange(keys.by_status(JobStatus.QUEUED.value), 0, MAX_LOOKED_AT - 1)]
    pipe = client.pipeline(transaction=False)
    for job_id in ids:
        pipe.hmget(keys.job(job_id), "status", "route", "queue")
        pipe.zscore(keys.UNSENT, job_id)
    answers = pipe.execute() if ids else []
    found = {}
    for job_id, (status, route, queue), unsent in zip(ids, answers[::2], answers[1::2], strict=True):
        if status == JobStatus.QUEUED.value and unsent is None and (route or queue):
            found[job_id] = route or queue
    return found


def _present(client: redis.Redis, queues: set[str]) -> set[str]:
    """The jobs whose message waits in one of ``queues`` or was delivered and not acknowledged."""
    pipe = client.pipeline(transaction=False)
    for queue in sorted(queues):
        for _, name in broker.priority_lists(queue):
            pipe.lrange(name, 0, -1)
    pipe.hvals(keys.KOMBU_UNACKED)
    return set().union(*(_message_ids(raw) for raw in pipe.execute()))


def send_lost(client: redis.Redis, now: float | None = None) -> list[str]:
    """One look for queued jobs whose message is nowhere; send again those missing at two looks
    in a row, and return their ids. Does nothing when another look was less than a lease ago."""
    now = time.time() if now is None else now
    if not client.set(keys.LOST_LOOK, repr(now), nx=True, px=max(1000, int(get_settings().lease_ttl * 1000))):
        return []
    waiting = _queued_with_message_sent(client)
    present = _present(client, set(waiting.values())) if waiting else set()
    missing = [job_id for job_id in waiting if job_id not in present]
    before: Any = client.hgetall(keys.LOST_SEEN)
    seen: dict[Any, Any] = {job_id: str(before.get(job_id, repr(now))) for job_id in missing}
    sent = []
    for job_id in [j for j in missing if j in before]:
        try:
            record = jobstore.get(client, job_id)
            if record.status is not JobStatus.QUEUED:
                continue
            log.warning("job %s is queued, but its message is in no queue and no worker has it (lost between "
                        "Redis and a consumer, first seen missing %.0f s ago); sending it again", job_id,
                        now - float(before[job_id]))
            broker.enqueue(record)
            jobstore.sent(client, job_id)
        except JobNotFound:
            continue
        except Exception as e:  # kept as missing: the next look sends it again
            log.warning("job %s: its lost message could not be sent again (%s); trying at the next look", job_id, e)
            continue
        sent.append(job_id)
        del seen[job_id]  # sent: a look finds the new message, or counts it missing from scratch
    pipe = client.pipeline()
    pipe.delete(keys.LOST_SEEN)
    if seen:
        pipe.hset(keys.LOST_SEEN, mapping=seen)
    pipe.execute()
    return sent
