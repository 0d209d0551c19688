"""The worker's side of one running attempt: its lease, its credential, and when it must stop."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from functools import lru_cache

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from deepe_tasks.core import jobstore, keys
from deepe_tasks.core.connection import connect
from deepe_tasks.core.events import decode
from deepe_tasks.core.ipc import CUTOFF_SIGNAL, PREEMPT_SIGNAL
from deepe_tasks.core.records import Event, EventKind, JobRecord, RunResult, StopReason
from deepe_tasks.core.settings import Settings
from deepe_tasks.worker import credentials, watchdog
from deepe_tasks.worker.lifecycle import worker_stopping
from deepe_tasks.worker.processes import JobProcess, kill_group

log = logging.getLogger(__name__)

# Seconds between Flower progress reports (a result write and an event each): every second
# by default, every 10 s with DEEPE_FLEET=large, where a thousand workers share one Redis.
PROGRESS_INTERVAL = {"small": 1.0, "large": 10.0}
# The worker reads the cancel flag this often, for the grace before a kill; the job process
# itself reads it every second and stops at its next step.
CANCEL_READ_INTERVAL = 2.0


@lru_cache(maxsize=8)
def lease_client(url: str, timeout: float) -> redis.Redis:
    """A client that gives up fast: a worker cut off from Redis must notice within its lease."""
    # No retries inside redis-py: a lost reply is answered by the caller's own next step (each
    # transition is safe to send again), not by waiting out several timeouts here.
    return connect(url, decode_responses=True, socket_timeout=timeout, socket_connect_timeout=timeout,
                   retry=Retry(NoBackoff(), 0))


def client_for(settings: Settings) -> redis.Redis:
    return lease_client(settings.redis_url, settings.redis_call_timeout)


class Attempt:
    """One attempt of a job, as its worker holds it: the fencing token (``record.attempts``),
    the lease, and the attempt's own Redis user."""

    def __init__(self, record: JobRecord, holder: str, settings: Settings) -> None:
        self.record = record
        self.job_id = record.id
        self.number = record.attempts
        self.holder = holder
        self.settings = settings
        self.client = client_for(settings)
        self.ttl_ms = settings.lease_key_ms
        self.credential = credentials.AttemptCredential(self.client, settings.redis_url, record.id, record.attempts)

    def renew(self) -> jobstore.Renewal:
        return jobstore.renew(self.client, self.job_id, self.number, self.holder, self.ttl_ms)

    def finish(self, result: RunResult, final: Event) -> bool:
        return jobstore.finish(self.client, self.job_id, self.number, final, status=result.status, error=result.error,
                               metrics=result.metrics, output_dir=result.output_dir)

    def requeue(self, why: str, preempted: bool = False) -> jobstore.RequeueOutcome:
        return jobstore.requeue(self.client, self.record, why, self.settings.max_resumes, lease_must_be_gone=False,
                                preempted=preempted)

    def drop_credential(self) -> None:
        """Delete the attempt's Redis user (which closes its connections); best effort."""
        self.credential.delete()


class Supervisor:
    """Waits for the job process: renews the lease, and stops the job when it must.

    A cancel or time limit is read by the job itself at its next step; if it has not stopped
    after DEEPE_CANCEL_GRACE seconds, its process group is killed (a cancel that saves gets the
    grace again once saving began). A worker shutdown is relayed as a signal, so the job
    checkpoints and is requeued. A worker that cannot reach Redis for a whole DEEPE_LEASE_TTL
    (`Settings.cutoff_s`) tells the job to checkpoint and stop, before its lease can expire
    and another worker take the job over; one that finds the job taken over kills it at once.
    """

    def __init__(self, attempt: Attempt, proc: JobProcess, progress: Callable[[], None] | None = None) -> None:
        self.attempt = attempt
        self.proc = proc
        self.progress = progress
        self.settings = attempt.settings
        self.client = attempt.client
        self.job_id = attempt.job_id
        self.stop_asked: dict[StopReason, float] = {}
        self.last_renewed = time.monotonic()
        self.save_on_cancel = False
        self.saving_seen = False

    def watch(self) -> StopReason | None:
        """Wait for the job process to end; return why it was stopped (None: it ended by itself)."""
        done = threading.Event()
        if self.progress is not None:
            # On a thread of its own: Flower's view goes through Celery's connections, whose
            # waits during a partition must never delay the lease and stop decisions here.
            threading.Thread(target=self._report_progress, args=(self.progress, done), daemon=True,
                             name=f"deepe-progress-{self.job_id}").start()
        try:
            return self._watch()
        finally:
            done.set()

    def _report_progress(self, report: Callable[[], None], done: threading.Event) -> None:
        while not done.wait(PROGRESS_INTERVAL[self.settings.fleet]):
            # Only while the lease is fresh: a report of an attempt that may have lost the job
            # could reach Celery's result backend after its replacement finished.
            if time.monotonic() - self.last_renewed > self.settings.lease_ttl / 2:
                continue
            try:
                report()
            except Exception as e:  # Flower's view is a nicety: never let it end the job
                log.warning("job %s: could not report progress: %s", self.job_id, e)

    def _watch(self) -> StopReason | None:
        ttl, grace, cutoff = self.settings.lease_ttl, self.settings.cancel_grace, self.settings.cutoff_s
        renew_every = ttl / 3
        self.last_renewed = last_contact = started = time.monotonic()
        next_renew = next_cancel_read = started  # at once: handing the job over may have taken a while
        troubled = False  # Redis failed since the last renewal: the attempt's user may be gone
        limit = self.attempt.record.time_limit
        while True:
            watchdog.beat()
            try:
                self.proc.wait(timeout=0.25)
                return self._first_reason()
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            try:
                if now >= next_renew:
                    if self.attempt.renew() is jobstore.Renewal.FENCED:
                        log.error("job %s: attempt %d was replaced by another; stopping it now",
                                  self.job_id, self.attempt.number)
                        kill_group(self.proc)  # never two trainers
                        return StopReason.FENCED
                    # A renewal counts only once DEEPE_REDIS_MIN_REPLICAS replicas have it
                    # (jobstore raises NotReplicated otherwise): the lease a failover could
                    # promote is then never older than the cutoff below counts from.
                    self.last_renewed, next_renew = now, now + renew_every
                    last_contact = time.monotonic()
                    if troubled and self.attempt.credential.scoped:
                        self.attempt.credential.ensure()  # a restarted Redis forgot ACL users
                    else:
                        # So does a promoted replica, whether the sentinels or a managed
                        # service's DNS name it, and a reconnect can hide both from the renewal.
                        self.attempt.credential.ensure_present()
                    troubled = False
                if now >= next_cancel_read:
                    self._read_cancel(now)
                    next_cancel_read = now + CANCEL_READ_INTERVAL
                    if not self.settings.min_replicas:  # a read proves nothing a replica has
                        last_contact = time.monotonic()
            except redis.RedisError as e:
                if not troubled:  # once per outage, not four times a second
                    log.warning("job %s: could not reach Redis: %s", self.job_id, e)
                troubled = True
                next_renew = min(next_renew, time.monotonic() + 0.25)  # renew as soon as Redis is back
            now = time.monotonic()
            if now - last_contact >= cutoff and StopReason.CUT_OFF not in self.stop_asked:
                log.error("job %s: Redis unreachable for %.1f s (DEEPE_LEASE_TTL=%g s); another worker may take the "
                          "job over, so this attempt checkpoints and stops", self.job_id, now - last_contact, ttl)
                self._ask(StopReason.CUT_OFF, now, CUTOFF_SIGNAL)
            if limit is not None and now - started >= limit:
                self.stop_asked.setdefault(StopReason.TIME_LIMIT, now)
            if StopReason.PREEMPT not in self.stop_asked and worker_stopping():
                log.warning("job %s: the worker is shutting down; checkpointing to requeue", self.job_id)
                self._ask(StopReason.PREEMPT, now, PREEMPT_SIGNAL)
            if self.stop_asked and now - min(self.stop_asked.values()) > grace:
                log.warning("job %s did not stop within %.0f s; killing it", self.job_id, grace)
                kill_group(self.proc)
                return self._first_reason()

    def _first_reason(self) -> StopReason | None:
        return min(self.stop_asked, key=lambda k: self.stop_asked[k]) if self.stop_asked else None

    def _ask(self, reason: StopReason, now: float, sig: signal.Signals) -> None:
        self.stop_asked[reason] = now
        try:
            os.kill(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def _read_cancel(self, now: float) -> None:
        if StopReason.CANCEL not in self.stop_asked:
            flag = self.client.get(keys.cancel(self.job_id))
            if flag is not None:
                self.stop_asked[StopReason.CANCEL] = now
                self.save_on_cancel = flag == "save"
        elif self.save_on_cancel and not self.saving_seen and self._saving():
            # Saving a model takes its own time: the grace starts again when it begins.
            self.saving_seen = True
            self.stop_asked[StopReason.CANCEL] = now

    def _saving(self) -> bool:
        recent: list[tuple[str, dict[str, str]]] = self.client.xrevrange(  # type: ignore[assignment]
            keys.events(self.job_id), count=10)
        mine = str(self.attempt.number)
        return any(event is not None and event.kind is EventKind.SAVING and fields.get("a") == mine
                   for (_, fields), (_, event) in zip(recent, decode(recent), strict=True))
