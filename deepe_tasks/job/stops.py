"""What a job process asks before it goes on: should it stop (StopFlags, read by the callback
at every step), and may it publish (PublishFence, the fenced check before the rename)."""

from __future__ import annotations

import logging
import time

import redis

from deepe_tasks.core import jobstore, keys
from deepe_tasks.core.ipc import CUTOFF_SIGNAL
from deepe_tasks.core.records import JobSpec, StopReason

CANCEL_READ_INTERVAL = 1.0


class StopFlags:
    """Why this job should stop, checked by the callback on every step.

    Preemption and a lost lease arrive as signals from the worker and the time limit is a
    clock: none costs anything. The cancel flag is in Redis, read at most once a second.
    """

    def __init__(self, client: redis.Redis, spec: JobSpec) -> None:
        self.client = client
        self.key = keys.cancel(spec.job_id)
        self.deadline = time.monotonic() + spec.time_limit if spec.time_limit else None
        self.signalled: StopReason | None = None
        self._next_read = 0.0
        self._cancel: StopReason | None = None

    def on_signal(self, signum: int, frame: object) -> None:
        self.signalled = StopReason.CUT_OFF if signum == CUTOFF_SIGNAL else StopReason.PREEMPT

    def check(self, fresh: bool = False) -> StopReason | None:
        """Why to stop now, or None; ``fresh`` reads the cancel flag even if it was read less than
        a second ago (a merge asks a few times only, the last just before it publishes)."""
        if self.signalled:
            return self.signalled
        now = time.monotonic()
        if self.deadline is not None and now >= self.deadline:
            return StopReason.TIME_LIMIT
        if fresh or now >= self._next_read:
            self._next_read = now + CANCEL_READ_INTERVAL
            try:
                value = self.client.get(self.key)
            except redis.RedisError:
                value = None  # a Redis outage must not stop training
            if value is not None:
                self._cancel = StopReason.CANCEL_SAVE if value == "save" else StopReason.CANCEL
        return self._cancel


class PublishFence:
    """The last step before a model is renamed into OUTPUT_DIR: is this attempt still the job's?

    It waits (up to one lease TTL) while Redis is unreachable or the lease is about to expire,
    and says no once another attempt owns the job, or if Redis never answered.
    """

    MIN_LEASE_MS = 1000

    def __init__(self, client: redis.Redis, spec: JobSpec) -> None:
        self.client = client
        self.spec = spec
        self.refused = False

    def __call__(self) -> bool:
        self.refused = not self._current()
        return not self.refused

    def _current(self) -> bool:
        deadline = time.monotonic() + self.spec.lease_ttl
        while True:
            try:
                answer = jobstore.check_current(self.client, self.spec.job_id, self.spec.attempt, self.MIN_LEASE_MS)
                if answer is jobstore.PublishCheck.OK:
                    # What the check read (the claim, the lease) is on the replicas too: a
                    # failover now cannot hand the job to another attempt before the rename.
                    jobstore.barrier(self.client, self.spec.job_id, "The publish check")
                    return True
                if answer is not jobstore.PublishCheck.LEASE_SHORT:
                    return False
            except redis.RedisError as e:
                logging.warning("the publish check could not reach Redis: %s", e)
            if time.monotonic() > deadline:
                return False
            time.sleep(0.25)
