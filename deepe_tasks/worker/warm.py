"""Warm start, the worker's half: a zygote kept running for the worker's pool process,
restarted when it dies, and its spare job process taken for each job (`zygote_client` speaks
the protocol; the zygote itself is `job/zygote.py`)."""

from __future__ import annotations

import logging
import threading
import time

from deepe_tasks.worker.zygote_client import ForkedJob, SpawnZygote, ZygoteClient

log = logging.getLogger(__name__)


class WarmStart:
    """Keeps a zygote running for this worker process; restarts it when it dies.

    A zygote that keeps dying young (a broken import, CUDA touched at import, a memory limit
    too small for the stack) is given up after MAX_EARLY_DEATHS: jobs then start cold.
    """

    CHECK_INTERVAL = 1.0
    EARLY = 60.0  # seconds: a zygote that dies sooner died young
    MAX_EARLY_DEATHS = 3

    def __init__(self, spawn: SpawnZygote) -> None:
        self._spawn = spawn
        self._zygote: ZygoteClient | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._early_deaths = 0
        # The zygote is spawned from this long-lived thread: PR_SET_PDEATHSIG fires when the
        # spawning *thread* ends, and this one ends only with the worker.
        self._thread = threading.Thread(target=self._run, name="deepe-zygote", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed:
            with self._lock:
                z = self._zygote
                if z is not None and z.proc.poll() is not None:
                    z.close()
                    self._zygote = None
                    young = time.time() - z.started < self.EARLY
                    self._early_deaths = self._early_deaths + 1 if young else 0
                    if self._early_deaths >= self.MAX_EARLY_DEATHS:
                        log.error("the zygote died %d times within %.0f s of its start (see its errors above); "
                                  "job processes start cold from now on", self._early_deaths, self.EARLY)
                        self._closed = True
                        return
                    log.warning("the zygote (pid %d) died with code %s; restarting it", z.proc.pid, z.proc.returncode)
                if self._zygote is None and not self._closed:
                    try:
                        self._zygote = ZygoteClient(self._spawn)
                    except Exception as e:  # never let this thread die
                        log.warning("could not start the zygote: %s", e)
            self._wake.wait(self.CHECK_INTERVAL)
            self._wake.clear()

    def take(self, wait: float = 600.0, start_timeout: float = 60.0) -> ForkedJob | None:
        """The zygote's spare, waiting for its spec; None if the zygote cannot give one.

        Nothing is used up until ``ForkedJob.start``: a job that is dropped leaves the spare.
        """
        deadline = time.monotonic() + 30
        while True:
            with self._lock:
                z = self._zygote
            if z is not None and z.proc.poll() is None:
                break
            if self._closed or time.monotonic() >= deadline:
                return None
            self._wake.set()  # a dead zygote is replaced now, not at the next check
            time.sleep(0.05)  # the zygote is being (re)started
        spare = z.next_spare(wait)
        if spare is None:
            return None
        pid, forked_at, ready = spare
        return ForkedJob(z, pid, forked_at, warm=ready, start_timeout=start_timeout)

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        with self._lock:
            z, self._zygote = self._zygote, None
        if z is not None:
            z.close()
