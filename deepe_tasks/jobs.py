"""The job records in Redis: create, read, update and list."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

import redis

from . import keys
from .errors import JobExists, JobNotFound
from .records import JobRecord, JobStatus

# A new job in one step: refuse a taken id; else pin the method's source (KEYS[3]), write the
# record (KEYS[1]), index it (KEYS[2]) and append its first event (KEYS[4]).
_CREATE = """
if redis.call('exists', KEYS[1]) == 1 then return 0 end
redis.call('set', KEYS[3], ARGV[1])
redis.call('hset', KEYS[1], unpack(ARGV, 5))
redis.call('zadd', KEYS[2], ARGV[2], ARGV[3])
redis.call('xadd', KEYS[4], '*', 'data', ARGV[4])
return 1
"""


def create(client: redis.Redis, record: JobRecord, source: str, first_event: str) -> None:
    """Write a new record, with its method's source pinned and its first event; refuse an id
    that is already taken."""
    flat = _flat(record.to_redis())
    names = [keys.job(record.id), keys.JOBS_INDEX, keys.method_source(record.method_sha256), keys.events(record.id)]
    if not client.eval(_CREATE, len(names), *names, source, record.submitted_at, record.id, first_event, *flat):
        raise JobExists(f"A job with id {record.id!r} already exists; submit without an id, or pick a new one.")


def get(client: redis.Redis, job_id: str) -> JobRecord:
    raw: dict[str, str] = client.hgetall(keys.job(job_id))  # type: ignore[assignment]
    if not raw:
        raise JobNotFound(f"There is no job {job_id!r}; `deepe jobs` lists the recent ones.")
    return JobRecord.from_redis(raw)


def update(client: redis.Redis, job_id: str, **fields: Any) -> None:
    """Set the given fields; fields given as None are left as they are."""
    mapping = _encode(fields)
    if mapping:
        client.hset(keys.job(job_id), mapping=mapping)  # type: ignore[arg-type]


def _flat(mapping: dict[str, str]) -> list[str]:
    """A mapping as Redis script arguments: key, value, key, value…"""
    return [item for pair in mapping.items() for item in pair]


def _encode(fields: dict[str, Any]) -> dict[str, str]:
    return {
        k: JobRecord.to_redis_value(k, v.value if isinstance(v, Enum) else v)
        for k, v in fields.items()
        if v is not None
    }


def status(client: redis.Redis, job_id: str) -> JobStatus:
    value = client.hget(keys.job(job_id), "status")
    if value is None:
        raise JobNotFound(f"There is no job {job_id!r}; `deepe jobs` lists the recent ones.")
    return JobStatus(value)


# Set fields only while the status is one of ARGV[1] (comma-separated), and, when KEYS[3] is
# given, only while that key does not exist: no lost updates between a cancel, a worker
# picking the job up and a reaper requeueing it. ARGV[2] is "add" or "rem" to move the job
# (ARGV[3]) into or out of the running set (KEYS[2]) in the same step, so that no crash can
# leave a running job the reaper does not see.
_TRANSITION = """
local status = redis.call('hget', KEYS[1], 'status')
if not status then return 0 end
if KEYS[3] and redis.call('exists', KEYS[3]) == 1 then return 0 end
for allowed in string.gmatch(ARGV[1], '[^,]+') do
  if allowed == status then
    redis.call('hset', KEYS[1], unpack(ARGV, 4))
    if ARGV[2] == 'add' then redis.call('sadd', KEYS[2], ARGV[3]) end
    if ARGV[2] == 'rem' then redis.call('srem', KEYS[2], ARGV[3]) end
    return 1
  end
end
return 0
"""


def transition(client: redis.Redis, job_id: str, allowed_from: set[JobStatus], *,
               unless_exists: str | None = None, running: bool | None = None, **fields: Any) -> bool:
    """Set ``fields`` if the job's status is in ``allowed_from`` (and ``unless_exists`` is absent);
    with ``running``, also add the job to the running set (True) or remove it (False)."""
    flat = _flat(_encode(fields))
    allowed = ",".join(s.value for s in allowed_from)
    op = "" if running is None else ("add" if running else "rem")
    names = [keys.job(job_id), keys.RUNNING] + ([unless_exists] if unless_exists else [])
    return bool(client.eval(_TRANSITION, len(names), *names, allowed, op, job_id, *flat))


# A worker takes a job in one step: the job must be queued or running (a redelivery after its
# lease expired), and its lease free. Then the lease is ours, the job is running this attempt
# on this worker, and the reply carries the record and the pinned source of its method.
# (The source key is built from the record, so this script needs a single Redis, not a
# cluster; Celery's Redis transport needs one anyway.)
_CLAIM = """
local status = redis.call('hget', KEYS[1], 'status')
if not status then return {'missing', ''} end
if status ~= 'queued' and status ~= 'running' then return {'ended', status} end
if not redis.call('set', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {'leased', redis.call('get', KEYS[2]) or ''}
end
redis.call('hincrby', KEYS[1], 'attempts', 1)
redis.call('hset', KEYS[1], 'status', 'running', 'worker', ARGV[4], 'started_at', ARGV[5], 'pid', ARGV[6])
redis.call('sadd', KEYS[3], ARGV[3])
local sha = redis.call('hget', KEYS[1], 'method_sha256') or ''
return {'ok', redis.call('hgetall', KEYS[1]), redis.call('get', ARGV[7] .. sha)}
"""


@dataclass
class Claim:
    """What a worker got when it tried to take a job: ``ok``, or why not, and the detail."""

    outcome: str  # "ok", "missing", "ended" (detail: its status) or "leased" (detail: the holder)
    detail: str = ""
    record: JobRecord | None = None
    source: str | None = None  # None if the pinned source is gone from Redis


def claim(client: redis.Redis, job_id: str, lease_key: str, token: str, ttl_ms: int, *,
          worker: str, started_at: float, pid: int) -> Claim:
    """Take the lease of a queued (or orphaned running) job and mark it running, atomically."""
    names = [keys.job(job_id), lease_key, keys.RUNNING]
    reply: Any = client.eval(_CLAIM, len(names), *names, token, ttl_ms, job_id, worker, started_at, pid,
                             keys.method_source(""))
    if reply[0] != "ok":
        return Claim(outcome=reply[0], detail=reply[1])
    flat = reply[1]
    record = JobRecord.from_redis(dict(zip(flat[::2], flat[1::2], strict=True)))
    return Claim(outcome="ok", record=record, source=reply[2])
