"""A job's lease: a Redis key with a TTL, held by the one worker that runs the job."""

from __future__ import annotations

import os
import socket
import uuid

import redis

from . import keys

# Renew or release only a lease that is still ours.
_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
# Take an expired lease back only while the job still runs this very attempt (no reaper
# requeued it meanwhile).
_RETAKE = """
if redis.call('exists', KEYS[1]) == 1 then return 0 end
if redis.call('hget', KEYS[2], 'status') ~= 'running' then return 0 end
if redis.call('hget', KEYS[2], 'attempts') ~= ARGV[3] then return 0 end
return redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2]) and 1 or 0
"""


class Lease:
    def __init__(self, client: redis.Redis, job_id: str, ttl: float) -> None:
        self.client = client
        self.job_id = job_id
        self.key = keys.lease(job_id)
        self.ttl_ms = int(ttl * 1000)
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def acquire(self) -> bool:
        return bool(self.client.set(self.key, self.token, nx=True, px=self.ttl_ms))

    def renew(self) -> bool:
        return bool(self.client.eval(_RENEW, 1, self.key, self.token, self.ttl_ms))

    def retake(self, attempt: int) -> bool:
        """After an outage longer than the TTL: take the lease back if the job is still ours."""
        return bool(self.client.eval(_RETAKE, 2, self.key, keys.job(self.job_id), self.token, self.ttl_ms, str(attempt)))

    def held(self) -> bool:
        return self.client.get(self.key) == self.token

    def release(self) -> bool:
        return bool(self.client.eval(_RELEASE, 1, self.key, self.token))

    def holder(self) -> str | None:
        value = self.client.get(self.key)
        return str(value) if value is not None else None
