"""The one owner of the job state machine: every write of a job's record, lease or stream.

Each transition is one Lua step that checks the job's current state and, for the writes of
an attempt, its *fencing token* (the attempt number, counted up by each claim), then writes
the record, the running set, the lease and the event together. A write whose token is no
longer the job's current one is refused, so an attempt that was cut off and replaced can
never speak again. docs/reliability.md has the states and transitions as a table.

Stream entries carry ``data`` (the event as JSON), ``a`` (the attempt that wrote it, 0 for
the platform's own events before a claim) and ``s`` (the attempt's sequence number, 0 for
the platform's events): a batch sent again after a timeout is never appended twice.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any

import redis

from . import keys
from .errors import InvalidJobState, JobExists, JobNotFound
from .records import Event, EventKind, JobRecord, JobStatus

# The token check that opens every fenced transition: the job runs this very attempt.
_CURRENT = """
local function current(job, attempt)
  return redis.call('hget', job, 'status') == 'running' and redis.call('hget', job, 'attempts') == attempt
end
-- An event of the platform's; pcall: a stream that a method broke (it may write its own
-- stream) must not stop the job's state from changing.
local function event(stream, data, attempt)
  redis.pcall('xadd', stream, '*', 'data', data, 'a', attempt, 's', 0)
end
-- All or nothing: before a step writes, every key it writes must hold its own type (or none),
-- since Redis does not undo the writes of a script that fails half-way. Pairs: key, type.
local function mistyped(pairs)
  for i = 1, #pairs, 2 do
    local t = redis.call('type', pairs[i])['ok']
    if t ~= 'none' and t ~= pairs[i + 1] then return pairs[i] .. ' is a ' .. t end
  end
  return false
end
"""

# The job is also put in the unsent set until its message is sent (`sent`): a client that dies
# in between leaves it to the reaper, which sends it. A create sent again after a lost reply
# finds its own record (same submit time) and succeeds.
# KEYS: job, index, source, events, unsent. ARGV: source, submitted_at, id, first event, fields…
_CREATE = _CURRENT + """
if redis.call('exists', KEYS[1]) == 1 then
  return redis.call('hget', KEYS[1], 'submitted_at') == ARGV[2] and 1 or 0
end
redis.call('set', KEYS[3], ARGV[1])
redis.call('hset', KEYS[1], unpack(ARGV, 5))
redis.call('zadd', KEYS[2], ARGV[2], ARGV[3])
redis.call('zadd', KEYS[5], ARGV[2], ARGV[3])
event(KEYS[4], ARGV[4], 0)
return 1
"""

# A worker takes a queued job, or a running one whose lease expired (a redelivery), in one
# step: the attempt count goes up (the new fencing token), the lease is "ATTEMPT:HOLDER", the
# job is running on this worker, in the running set, with its `started` event; the reply
# carries the record and the method's pinned source.
# The same claim sent again after a lost reply (the lease is this holder's) gets the same answer.
# KEYS: job, lease, running, events, unsent. ARGV: holder, ttl_ms, id, worker, started_at, pid,
# source key prefix, started event (with "@ATTEMPT@" for the attempt).
_CLAIM = _CURRENT + """
local status = redis.call('hget', KEYS[1], 'status')
if not status then return {'missing', ''} end
if status ~= 'queued' and status ~= 'running' then return {'ended', status} end
local bad = mistyped({KEYS[1], 'hash', KEYS[2], 'string', KEYS[3], 'set', KEYS[4], 'stream', KEYS[5], 'zset'})
if bad then return {'corrupt', bad} end
local sha = redis.call('hget', KEYS[1], 'method_sha256') or ''
local holder = redis.call('get', KEYS[2])
if holder then
  if status == 'running' and holder == redis.call('hget', KEYS[1], 'attempts') .. ':' .. ARGV[1] then
    return {'ok', redis.call('hgetall', KEYS[1]), redis.call('get', ARGV[7] .. sha)}
  end
  return {'leased', holder}
end
local attempt = redis.call('hincrby', KEYS[1], 'attempts', 1)
redis.call('set', KEYS[2], attempt .. ':' .. ARGV[1], 'PX', ARGV[2])
redis.call('hset', KEYS[1], 'status', 'running', 'worker', ARGV[4], 'started_at', ARGV[5], 'pid', ARGV[6])
redis.call('hdel', KEYS[1], 'last_step')  -- the job moved on: an older step is not answered again
redis.call('sadd', KEYS[3], ARGV[3])
redis.call('zrem', KEYS[5], ARGV[3])
event(KEYS[4], (string.gsub(ARGV[8], '"@ATTEMPT@"', tostring(attempt))), attempt)
return {'ok', redis.call('hgetall', KEYS[1]), redis.call('get', ARGV[7] .. sha)}
"""

# Keep the lease of the current attempt; take it back if it expired and nobody replaced us.
# KEYS: job, lease. ARGV: attempt, lease value, ttl_ms. 1 renewed, 2 retaken, 0 fenced off.
_RENEW = _CURRENT + """
if not current(KEYS[1], ARGV[1]) then return 0 end
local value = redis.call('get', KEYS[2])
if value == ARGV[2] then redis.call('pexpire', KEYS[2], ARGV[3]) return 1 end
if not value then redis.call('set', KEYS[2], ARGV[2], 'PX', ARGV[3]) return 2 end
return 0
"""

# Events of the current attempt, each once. KEYS: events. ARGV: job key, attempt, then seq
# and event pairs, seqs rising. Returns how many were appended, -1 if the attempt is fenced
# off. (The job process runs this and the next script with a user that may only read the job's
# record and lease; Redis checks keys declared in KEYS for write access, so those two come in
# ARGV, and each command in the script is checked on its own.)
APPEND = _CURRENT + """
if not current(ARGV[1], ARGV[2]) then return -1 end
local last = 0
local top = redis.call('xrevrange', KEYS[1], '+', '-', 'COUNT', 1)
if top[1] then
  local f, a, s = top[1][2], nil, nil
  for i = 1, #f, 2 do
    if f[i] == 'a' then a = f[i + 1] elseif f[i] == 's' then s = f[i + 1] end
  end
  if a == ARGV[2] and s then last = tonumber(s) end
end
local n = 0
for i = 3, #ARGV, 2 do
  if tonumber(ARGV[i]) > last then
    redis.call('xadd', KEYS[1], '*', 'data', ARGV[i + 1], 'a', ARGV[2], 's', ARGV[i])
    n = n + 1
  end
end
return n
"""

# May the current attempt publish its model now? Only while its lease has at least ARGV[2] ms
# left, so no other attempt can be claimed before the rename that follows is done.
# ARGV: job key, lease key, attempt, min_ttl_ms. 1 yes, 0 fenced off, -1 lease too short.
CHECK = _CURRENT + """
if not current(ARGV[1], ARGV[3]) then return 0 end
local value = redis.call('get', ARGV[2])
if not value or string.sub(value, 1, #ARGV[3] + 1) ~= ARGV[3] .. ':' then return -1 end
if redis.call('pttl', ARGV[2]) < tonumber(ARGV[4]) then return -1 end
return 1
"""

# The current attempt ends the job; the same finish sent again after a lost reply succeeds
# again, writing nothing. KEYS: job, running, lease, events. ARGV: attempt, id, final event,
# status, other fields…
_FINISH = _CURRENT + """
local step = 'finish:' .. ARGV[1] .. ':' .. ARGV[4]
if redis.call('hget', KEYS[1], 'last_step') == step then return 1 end
if not current(KEYS[1], ARGV[1]) then return 0 end
local bad = mistyped({KEYS[1], 'hash', KEYS[2], 'set', KEYS[4], 'stream'})
if bad then return redis.error_reply('the job was not finished: ' .. bad) end
redis.call('hset', KEYS[1], 'last_step', step, 'status', ARGV[4], unpack(ARGV, 5))
redis.call('srem', KEYS[2], ARGV[2])
redis.call('del', KEYS[3])
event(KEYS[4], ARGV[3], ARGV[1])
return 1
"""

# A running attempt is over without an end of its own: its worker shut down or lost Redis
# (the attempt itself asks, with ARGV[3] = '0'), or its lease expired (the reaper asks, with
# ARGV[3] = '1', and a live lease wins). A plain cancel that waits makes it cancelled; past
# DEEPE_MAX_RESUMES it fails; else it is queued again.
# A requeued job goes into the unsent set until its message is sent. The same requeue sent
# again after a lost reply gets the same answer, writing nothing.
# KEYS: job, running, lease, events, cancel, unsent. ARGV: attempt, id, lease must be gone,
# max resumes, now, cancelled error, cancelled event, failed error, failed event, requeued event.
_REQUEUE = _CURRENT + """
local last = redis.call('hget', KEYS[1], 'last_step') or ''
local mine = 'requeue:' .. ARGV[1] .. ':'
if string.sub(last, 1, #mine) == mine then return string.sub(last, #mine + 1) end
if not current(KEYS[1], ARGV[1]) then return 'stale' end
if ARGV[3] == '1' and redis.call('exists', KEYS[3]) == 1 then return 'leased' end
local bad = mistyped({KEYS[1], 'hash', KEYS[2], 'set', KEYS[4], 'stream', KEYS[6], 'zset'})
if bad then return redis.error_reply('the job was not requeued: ' .. bad) end
redis.call('del', KEYS[3])
redis.call('srem', KEYS[2], ARGV[2])
local outcome, fields, data = 'queued', {'status', 'queued'}, ARGV[10]
if redis.call('get', KEYS[5]) == 'cancel' then
  outcome, fields, data = 'cancelled', {'status', 'cancelled', 'error', ARGV[6], 'finished_at', ARGV[5]}, ARGV[7]
elseif tonumber(ARGV[1]) > tonumber(ARGV[4]) then
  outcome, fields, data = 'failed', {'status', 'failed', 'error', ARGV[8], 'finished_at', ARGV[5]}, ARGV[9]
else
  redis.call('zadd', KEYS[6], ARGV[5], ARGV[2])
end
redis.call('hset', KEYS[1], 'last_step', mine .. outcome, unpack(fields))
event(KEYS[4], data, ARGV[1])
return outcome
"""

# A cancel: always leaves the flag (the running attempt reads it); a queued job is cancelled
# at once. KEYS: job, cancel, events, unsent. ARGV: flag, flag ttl, now, error, event.
_CANCEL = _CURRENT + """
local status = redis.call('hget', KEYS[1], 'status')
if not status then return 'missing' end
if status ~= 'queued' and status ~= 'running' then return 'ended:' .. status end
redis.call('set', KEYS[2], ARGV[1], 'EX', ARGV[2])
if status == 'queued' then
  redis.call('zrem', KEYS[4], redis.call('hget', KEYS[1], 'id'))
  redis.call('hset', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[3], 'error', ARGV[4])
  event(KEYS[3], ARGV[5], redis.call('hget', KEYS[1], 'attempts') or 0)
  return 'cancelled'
end
return 'running'
"""

# A queued job whose message could not be sent fails. KEYS: job, events, unsent. ARGV: now,
# error, event.
_FAIL_QUEUED = _CURRENT + """
if redis.call('hget', KEYS[1], 'status') ~= 'queued' then return 0 end
redis.call('zrem', KEYS[3], redis.call('hget', KEYS[1], 'id'))
redis.call('hset', KEYS[1], 'status', 'failed', 'finished_at', ARGV[1], 'error', ARGV[2])
event(KEYS[2], ARGV[3], redis.call('hget', KEYS[1], 'attempts') or 0)
return 1
"""

# The running set holds running jobs only. KEYS: job, running. ARGV: id.
_FORGET_RUNNING = """
if redis.call('hget', KEYS[1], 'status') == 'running' then return 0 end
return redis.call('srem', KEYS[2], ARGV[1])
"""

# The current attempt's process changed (its spare died before the hand-over). KEYS: job.
_SET_PID = _CURRENT + """
if not current(KEYS[1], ARGV[1]) then return 0 end
redis.call('hset', KEYS[1], 'pid', ARGV[2])
return 1
"""

CANCEL_FLAG_TTL = 30 * 24 * 3600
ATTEMPT_PLACEHOLDER = "@ATTEMPT@"


# The scripts a job process runs, by EVALSHA only: the worker loads them (`credentials`).
JOB_SCRIPTS = (APPEND, CHECK)
_SHAS = {script: hashlib.sha1(script.encode()).hexdigest() for script in JOB_SCRIPTS}


def _loaded(client: redis.Redis, script: str, numkeys: int, *args: Any) -> Any:
    """Run a job script by its hash, loading it first where this client may (not a job process's)."""
    try:
        return client.evalsha(_SHAS[script], numkeys, *args)
    except redis.exceptions.NoScriptError:
        client.script_load(script)
        return client.evalsha(_SHAS[script], numkeys, *args)


def _flat(mapping: dict[str, str]) -> list[str]:
    """A mapping as Redis script arguments: key, value, key, value…"""
    return [item for pair in mapping.items() for item in pair]


def _encode(fields: dict[str, Any]) -> dict[str, str]:
    return {
        k: JobRecord.to_redis_value(k, v.value if isinstance(v, Enum) else v)
        for k, v in fields.items()
        if v is not None
    }


def not_found(job_id: str) -> JobNotFound:
    return JobNotFound(f"There is no job {job_id!r}; `deepe jobs` lists the recent ones.")


# -- reading ---------------------------------------------------------------------------------

def get(client: redis.Redis, job_id: str) -> JobRecord:
    raw: dict[str, str] = client.hgetall(keys.job(job_id))  # type: ignore[assignment]
    if not raw:
        raise not_found(job_id)
    return JobRecord.from_redis(raw)


def status(client: redis.Redis, job_id: str) -> JobStatus:
    value = client.hget(keys.job(job_id), "status")
    if value is None:
        raise not_found(job_id)
    return JobStatus(value)


# -- the transitions ---------------------------------------------------------------------------

def create(client: redis.Redis, record: JobRecord, source: str, first_event: Event) -> None:
    """queued: write a new record, with its method's source pinned and its first event; refuse an
    id that is already taken."""
    names = [keys.job(record.id), keys.JOBS_INDEX, keys.method_source(record.method_sha256), keys.events(record.id),
             keys.UNSENT]
    if not client.eval(_CREATE, len(names), *names, source, record.submitted_at, record.id,
                       first_event.to_json(), *_flat(record.to_redis())):
        raise JobExists(f"A job with id {record.id!r} already exists; submit without an id, or pick a new one.")


class ClaimOutcome(str, Enum):
    OK = "ok"
    MISSING = "missing"  # no record
    ENDED = "ended"  # detail: its final status
    LEASED = "leased"  # detail: the lease's holder
    CORRUPT = "corrupt"  # detail: which key has the wrong type (nothing was written)


@dataclass
class Claim:
    """What a worker got when it tried to take a job: ``ok``, or why not, and the detail."""

    outcome: ClaimOutcome
    detail: str = ""
    record: JobRecord | None = None
    source: str | None = None  # None if the pinned source is gone from Redis


def claim(client: redis.Redis, job_id: str, holder: str, ttl_ms: int, started: Event, *,
          worker: str, started_at: float, pid: int) -> Claim:
    """queued (or running, lease expired) → running: a new attempt with the next fencing token."""
    data = started.model_dump(mode="json", exclude={"id"})
    data["attempt"] = data["metrics"]["attempt"] = ATTEMPT_PLACEHOLDER
    names = [keys.job(job_id), keys.lease(job_id), keys.RUNNING, keys.events(job_id), keys.UNSENT]
    reply: Any = client.eval(_CLAIM, len(names), *names, holder, ttl_ms, job_id, worker, started_at, pid,
                             keys.method_source(""), json.dumps(data, separators=(",", ":")))
    if reply[0] != ClaimOutcome.OK.value:
        return Claim(outcome=ClaimOutcome(reply[0]), detail=reply[1])
    flat = reply[1]
    record = JobRecord.from_redis(dict(zip(flat[::2], flat[1::2], strict=True)))
    return Claim(outcome=ClaimOutcome.OK, record=record, source=reply[2])


class Renewal(int, Enum):
    FENCED = 0  # another attempt owns the job now, or it ended
    RENEWED = 1
    RETAKEN = 2  # the lease had expired, and nobody had replaced this attempt


def renew(client: redis.Redis, job_id: str, attempt: int, holder: str, ttl_ms: int) -> Renewal:
    """running → running: the current attempt keeps (or takes back) its lease."""
    value = lease_value(attempt, holder)
    return Renewal(int(client.eval(_RENEW, 2, keys.job(job_id), keys.lease(job_id), attempt, value, ttl_ms)))


def lease_value(attempt: int, holder: str) -> str:
    return f"{attempt}:{holder}"


def append(client: redis.Redis, job_id: str, attempt: int, events: list[tuple[int, str]]) -> int:
    """Append the current attempt's events, given as (sequence number, JSON) with rising numbers,
    each once; -1 if the attempt is fenced off (then nothing was appended)."""
    flat = [item for pair in events for item in pair]
    return int(_loaded(client, APPEND, 1, keys.events(job_id), keys.job(job_id), attempt, *flat))


class PublishCheck(int, Enum):
    LEASE_SHORT = -1  # the lease is about to expire (or gone): wait for the next renewal
    FENCED = 0
    OK = 1


def check_current(client: redis.Redis, job_id: str, attempt: int, min_ttl_ms: int) -> PublishCheck:
    """Whether ``attempt`` is the job's current one with at least ``min_ttl_ms`` of lease left."""
    return PublishCheck(int(_loaded(client, CHECK, 0, keys.job(job_id), keys.lease(job_id), attempt, min_ttl_ms)))


def finish(client: redis.Redis, job_id: str, attempt: int, final: Event, *, status: JobStatus,
           error: str | None, metrics: dict[str, Any], output_dir: str | None) -> bool:
    """running → succeeded, failed or cancelled, by the current attempt; False if fenced off."""
    fields = _encode({"error": error, "finished_at": time.time(), "metrics": metrics, "output_dir": output_dir})
    names = [keys.job(job_id), keys.RUNNING, keys.lease(job_id), keys.events(job_id)]
    return bool(client.eval(_FINISH, len(names), *names, attempt, job_id, final.to_json(), status.value,
                            *_flat(fields)))


class RequeueOutcome(str, Enum):
    QUEUED = "queued"
    CANCELLED = "cancelled"  # a plain cancel was waiting
    FAILED = "failed"  # past DEEPE_MAX_RESUMES
    STALE = "stale"  # another attempt owns the job, or it is not running
    LEASED = "leased"  # (reaper) the attempt still holds its lease


def requeue(client: redis.Redis, record: JobRecord, why: str, max_resumes: int, *,
            lease_must_be_gone: bool) -> RequeueOutcome:
    """running → queued (or cancelled, or failed past ``max_resumes``) for attempt
    ``record.attempts``; with ``lease_must_be_gone`` (the reaper), only once its lease expired."""
    job_id, attempt = record.id, record.attempts
    cancelled = f"cancelled; its worker stopped ({why}) before the job reached a step boundary"
    failed = (f"The job was interrupted {attempt} times (last: {why}) and DEEPE_MAX_RESUMES is {max_resumes}; "
              "its last checkpoint is in the job folder. Find out why its workers stop (memory, preemption), "
              "then submit it again.")
    requeued = Event(kind=EventKind.REQUEUED, job=job_id, attempt=attempt, message=f"requeued: {why}",
                     metrics={"attempt": attempt})
    names = [keys.job(job_id), keys.RUNNING, keys.lease(job_id), keys.events(job_id), keys.cancel(job_id),
             keys.UNSENT]
    reply = client.eval(
        _REQUEUE, len(names), *names, attempt, job_id, int(lease_must_be_gone), max_resumes, time.time(),
        cancelled, Event(kind=EventKind.CANCELLED, job=job_id, attempt=attempt, message=cancelled).to_json(),
        failed, Event(kind=EventKind.FAILED, job=job_id, attempt=attempt, message=failed).to_json(), requeued.to_json())
    return RequeueOutcome(reply)


def sent(client: redis.Redis, job_id: str) -> None:
    """The queued job's message is on its way: the reaper need not send it."""
    client.zrem(keys.UNSENT, job_id)


def unsent(client: redis.Redis, before: float) -> list[str]:
    """Jobs queued (or requeued) before ``before`` whose message was never sent."""
    return [str(j) for j in client.zrangebyscore(keys.UNSENT, 0, before)]


def cancel(client: redis.Redis, job_id: str, save: bool) -> JobStatus:
    """Leave the cancel flag for a running job (it stops at its next step), or cancel a queued one
    (queued → cancelled). Returns the job's status after it."""
    message = "cancelled before it started"
    event = Event(kind=EventKind.CANCELLED, job=job_id, message=message)
    names = [keys.job(job_id), keys.cancel(job_id), keys.events(job_id), keys.UNSENT]
    reply = str(client.eval(_CANCEL, len(names), *names, "save" if save else "cancel", CANCEL_FLAG_TTL,
                            time.time(), message, event.to_json()))
    if reply == "missing":
        raise not_found(job_id)
    if reply.startswith("ended:"):
        raise InvalidJobState(f"Job {job_id} is already {reply[6:]}; only queued or running jobs can be cancelled.")
    return JobStatus(reply)


def fail_queued(client: redis.Redis, job_id: str, error: str) -> bool:
    """queued → failed: the job's message could not be sent."""
    event = Event(kind=EventKind.FAILED, job=job_id, message=error)
    return bool(client.eval(_FAIL_QUEUED, 3, keys.job(job_id), keys.events(job_id), keys.UNSENT, time.time(), error,
                            event.to_json()))


def set_pid(client: redis.Redis, job_id: str, attempt: int, pid: int) -> bool:
    return bool(client.eval(_SET_PID, 1, keys.job(job_id), attempt, pid))


def forget_running(client: redis.Redis, job_id: str) -> bool:
    """Take a job that is not running (or has no record) out of the running set."""
    return bool(client.eval(_FORGET_RUNNING, 2, keys.job(job_id), keys.RUNNING, job_id))
