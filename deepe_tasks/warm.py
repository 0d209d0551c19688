"""A warm spare: one job process started ahead of time, with the training stack imported.

A job that arrives is handed to the spare (which then reads its spec on stdin), and a new
spare starts warming at once. Each job still gets a fresh process and a fresh CUDA context:
a spare imports torch but never touches CUDA.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

Spawn = Callable[[], subprocess.Popen[str]]


class WarmSpare:
    """Keeps one spare job process ready; replaces it when it is taken or dies."""

    CHECK_INTERVAL = 1.0

    def __init__(self, spawn: Spawn) -> None:
        self._spawn = spawn
        self._spare: subprocess.Popen[str] | None = None
        self._spare_started = 0.0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        # The spare is spawned from this long-lived thread: PR_SET_PDEATHSIG fires when the
        # spawning *thread* ends, and this one ends only with the worker.
        self._thread = threading.Thread(target=self._run, name="deepe-warm-spare", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed:
            with self._lock:
                if self._spare is not None and self._spare.poll() is not None:
                    log.warning("the warm spare (pid %d) died with code %s; replacing it",
                                self._spare.pid, self._spare.returncode)
                    self._spare = None
                if self._spare is None and not self._closed:
                    try:
                        self._spare, self._spare_started = self._spawn(), time.time()
                    except Exception as e:  # never let the spare's thread die
                        log.warning("could not start a warm spare: %s", e)
            self._wake.wait(self.CHECK_INTERVAL)
            self._wake.clear()

    def take(self) -> tuple[subprocess.Popen[str], float] | None:
        """The spare and when it was started, if one is alive; a new one starts warming."""
        with self._lock:
            spare, started = self._spare, self._spare_started
            self._spare = None
        self._wake.set()
        if spare is None or spare.poll() is not None:
            return None
        return spare, started

    @property
    def pid(self) -> int | None:
        with self._lock:
            return self._spare.pid if self._spare is not None else None

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is not None and spare.stdin is not None:
            spare.stdin.close()  # a spare without a job exits quietly
