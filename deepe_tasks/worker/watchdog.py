"""The worker's watchdog: a worker that is stuck says so and exits, so that its supervisor
(systemd, Docker's restart policy, Kubernetes) starts a fresh one.

Every wait of a pool process on another process, a pipe or Redis is bounded, so a pool process
that does its work makes progress: it beats while it holds a claimed job (the Supervisor's loop
four times a second, every retry), and a thread of its own beats every second whatever it does.
The worker's main process reads both beats. A pool process whose thread stopped beating (it was
stopped, or is wedged in native code) or whose claimed job made no progress for
``Settings.stuck_after`` is killed, and the worker exits with ``EXIT_STUCK``: its job's lease
expires and another worker resumes the job. A worker that only *looks* alive (it answers
pings, its reaper runs) while it never takes another job is the failure this exists for.

The same holds for an idle worker whose Celery consumer stopped taking messages (after a broker
failover, a consumer can reconnect and then consume nothing: celery/celery#10096): when its
queues have held a message for ``Settings.consumer_stall_timeout`` while it held no job and took
none, it exits the same way, and a fresh worker takes the messages.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from typing import Any

from celery.signals import worker_process_init, worker_ready, worker_shutting_down
from celery.worker import state as worker_state

from deepe_tasks.core.broker import poll_interval, priority_lists
from deepe_tasks.core.connection import get_redis
from deepe_tasks.core.settings import Settings, get_settings

log = logging.getLogger(__name__)

EXIT_STUCK = 70  # EX_SOFTWARE: the worker found itself stuck and exited to be restarted
ALIVE_INTERVAL = 1.0  # seconds between the pool process's own beats
ALIVE_STALE = 30.0  # a pool process silent this long does not answer

# Shared memory made before Celery forks its pool process (as `lifecycle._stopping`): the pool
# process writes, the main process reads. Monotonic clock readings, the same in every process.
_ctx = multiprocessing.get_context("fork")
_pool_pid = _ctx.RawValue("i", 0)
_alive = _ctx.RawValue("d", 0.0)  # the pool process's thread beat last
_busy_since = _ctx.RawValue("d", 0.0)  # it claimed the job it holds now (0: it holds none)
_progress = _ctx.RawValue("d", 0.0)  # its claimed job made progress last
_job = _ctx.RawArray("c", 64)  # that job's id, for the log


def busy(job_id: str) -> None:
    """This pool process holds a claimed job from now on."""
    _job.value = job_id.encode()[:63]
    _progress.value = _busy_since.value = time.monotonic()


def beat() -> None:
    """The claimed job made progress (a lease renewal, a retry, a step of its hand-over)."""
    _progress.value = time.monotonic()


def idle() -> None:
    """This pool process holds no job any more."""
    _busy_since.value = 0.0


def stuck_reason(now: float, stuck_after: float) -> str | None:
    """Why the pool process is stuck, or None while it is not."""
    if _alive.value and now - _alive.value > ALIVE_STALE:
        return f"its pool process (pid {_pool_pid.value}) has not answered for {now - _alive.value:.0f} s"
    if _busy_since.value and now - _progress.value > stuck_after:
        return (f"its pool process (pid {_pool_pid.value}) has made no progress on job "
                f"{_job.value.decode(errors='replace')} for {now - _progress.value:.0f} s")
    return None


def _alive_loop() -> None:
    while True:
        _alive.value = time.monotonic()
        time.sleep(ALIVE_INTERVAL)


@worker_process_init.connect
def _pool_process_started(**_: Any) -> None:
    _pool_pid.value = os.getpid()
    _alive.value = time.monotonic()
    _busy_since.value = 0.0
    threading.Thread(target=_alive_loop, name="deepe-alive", daemon=True).start()


_stop = threading.Event()


# A round of the watch that comes this late means the worker's main process was stopped too
# (SIGSTOP of the whole worker tree, then SIGCONT): every beat is old then, and the pool process
# is given GRACE seconds to beat again before it is judged.
LOOP_GAP = 3.0
GRACE = 5.0


class Rounds:
    """When a round of the watch may judge: not within GRACE of a round that came late."""

    def __init__(self, now: float) -> None:
        self.last = self.judge_from = now

    def may_judge(self, now: float) -> bool:
        if now - self.last > LOOP_GAP:
            self.judge_from = now + GRACE
        self.last = now
        return now >= self.judge_from


class ConsumerStall:
    """When an idle worker's consumer counts as stalled: at every look for ``after`` seconds its
    queues held messages, it held no job, it took none, and the messages did not go down."""

    def __init__(self, after: float) -> None:
        self.after = after
        self.since: float | None = None
        self._last: tuple[int, int] | None = None  # (tasks taken, messages waiting) at the last look

    def observe(self, now: float, idle: bool, taken: int, waiting: int | None) -> float | None:
        """Seconds stalled, once past the bound; else None. ``waiting`` None: not known now."""
        last, self._last = self._last, (taken, waiting or 0)
        moved = last is not None and (taken != last[0] or (waiting or 0) < last[1])
        if not idle or not waiting or moved:
            self.since = None
            return None
        if self.since is None:
            self.since = now
        return now - self.since if now - self.since >= self.after else None


def consumed_queues(sender: Any) -> list[str]:
    """The Celery queues a worker was started on (``sender``: its Consumer at worker_ready)."""
    consumed = getattr(getattr(getattr(sender, "app", None), "amqp", None), "queues", None)
    return [str(q) for q in (getattr(consumed, "consume_from", None) or [get_settings().queue])]


def waiting_in(queues: list[str]) -> int | None:
    """Messages waiting in these queues, all priorities; None when Redis does not answer."""
    try:
        pipe = get_redis().pipeline(transaction=False)
        for queue in queues:
            for _, name in priority_lists(queue):
                pipe.llen(name)
        return sum(int(n) for n in pipe.execute())
    except Exception:  # unknown now: the next look tries again
        return None


def _idle() -> bool:
    return not (worker_state.active_requests or worker_state.reserved_requests or _busy_since.value)


def _stalled(stall: ConsumerStall, queues: list[str], now: float) -> str | None:
    idle = _idle()
    seconds = stall.observe(now, idle, worker_state.all_total_count[0], waiting_in(queues) if idle else 0)
    if seconds is None:
        return None
    return (f"its Celery consumer has taken no message for {seconds:.0f} s while it was idle and its queues "
            f"({', '.join(queues)}) held some (a consumer that reconnected after a broker failover and consumes "
            "nothing: celery/celery#10096)")


def _watch(settings: Settings, queues: list[str]) -> None:
    stuck_after = settings.stuck_after
    rounds = Rounds(time.monotonic())
    # The bound is at least a few polls: a healthy idle worker takes a message within one.
    stall = ConsumerStall(max(settings.consumer_stall_timeout, 3 * poll_interval(settings)))
    look_every, next_look = min(10.0, stall.after / 4), 0.0
    while not _stop.wait(1.0):
        now = time.monotonic()
        if not rounds.may_judge(now):
            continue
        reason = stuck_reason(now, stuck_after)
        if reason is not None:
            reason += f" (bound: {stuck_after:.0f} s)"
        elif now >= next_look:
            next_look = now + look_every
            reason = _stalled(stall, queues, now)
        if reason is None or _stop.is_set():
            continue
        log.critical("this worker is stuck: %s. It kills its pool process and exits with code %d so that its "
                     "supervisor restarts it; a job it held resumes elsewhere once its lease expires.",
                     reason, EXIT_STUCK)
        pid = _pool_pid.value
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)  # its zygote and job processes die with it (PDEATHSIG)
            except ProcessLookupError:
                pass
        logging.shutdown()
        os._exit(EXIT_STUCK)


@worker_ready.connect
def _start(sender: Any = None, **_: Any) -> None:
    concurrency = getattr(getattr(sender, "controller", None), "concurrency", 1)  # sender: the worker's Consumer
    if isinstance(concurrency, int) and concurrency > 1:
        # The beats are one pool process's; with more, the watchdog could not tell them apart.
        log.warning("the watchdog watches one pool process and this worker has --concurrency %d: it is off. "
                    "Run one deepe worker per device set (deepe worker runs with --concurrency 1).", concurrency)
        return
    threading.Thread(target=_watch, args=(get_settings(), consumed_queues(sender)), name="deepe-watchdog",
                     daemon=True).start()


@worker_shutting_down.connect
def _shutting_down(**_: Any) -> None:
    # A warm shutdown waits for the running job to checkpoint, as long as it takes: not stuck.
    _stop.set()
