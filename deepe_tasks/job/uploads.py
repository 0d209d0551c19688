"""A job's uploads to an object store while it trains: each complete checkpoint (its marker
last) and the job's logs, on a thread of its own (`job/remote.py` uses it)."""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path

from deepe_tasks.core.ipc import LOG_FILE
from deepe_tasks.core.objects import ObjectStore
from deepe_tasks.core.records import JobSpec
from deepe_tasks.core.storage import CHECKPOINT_DONE, EVENTS_FILE, attempt_dir, job_dir
from deepe_tasks.job import evaluation

log = logging.getLogger(__name__)

DRAIN_TIMEOUT = 600.0  # seconds an attempt's end waits for its uploads


class Uploader:
    """Uploads complete checkpoints and the job's logs on a thread of its own, the newest
    checkpoint waiting first (an older one not yet sent is skipped: a newer one supersedes it,
    unless it is the best one, KEEP_BEST's, which goes up before the newest)."""

    def __init__(self, store: ObjectStore, spec: JobSpec) -> None:
        self.store, self.spec = store, spec
        self.local = Path(spec.storage_root)
        self.uploaded: list[str] = []  # the checkpoints that reached the store, in order
        self.failures = 0
        self._waiting: queue.Queue[Path | None] = queue.Queue()
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="deepe-uploads", daemon=True)
        self._thread.start()

    def checkpoint(self, folder: Path) -> None:
        """A complete checkpoint (its marker written): upload it while training goes on."""
        self._idle.clear()
        self._waiting.put(folder)

    def drain(self, timeout: float = DRAIN_TIMEOUT) -> bool:
        """Wait for every upload asked for so far; False if they did not end in ``timeout``."""
        return self._idle.wait(timeout)

    def _run(self) -> None:
        while True:
            # A daemon thread's wait for work: it ends with the job process, never holds it.
            waiting = [f for f in [self._waiting.get(), *self._drain_queue()] if f is not None]
            for folder in _to_upload(waiting):
                try:
                    self._upload_checkpoint(folder)
                except Exception as e:  # the next checkpoint tries again; the job goes on
                    self.failures += 1
                    log.warning("the checkpoint %s could not be uploaded: %s", folder.name, e)
            if waiting:
                try:
                    self.logs()
                except Exception as e:
                    log.warning("the job's logs could not be uploaded: %s", e)
            if self._waiting.empty():
                self._idle.set()

    def _drain_queue(self) -> list[Path | None]:
        items = []
        while True:
            try:
                items.append(self._waiting.get_nowait())
            except queue.Empty:
                return items

    def _upload_checkpoint(self, folder: Path) -> None:
        if not (folder / CHECKPOINT_DONE).exists():
            return  # removed by the trainer's rotation meanwhile
        rel = folder.relative_to(self.local).as_posix()
        self.store.put_tree(folder, rel, last=[CHECKPOINT_DONE])
        self.uploaded.append(rel)
        # The trainer keeps a few checkpoints locally (save_total_limit): so does the store.
        parent = folder.parent.relative_to(self.local).as_posix()
        for other in self.store.glob(f"{parent}/checkpoint-*"):
            if other != rel and not (self.local / other).exists():
                self.store.remove(other)

    def logs(self) -> None:
        """This worker's copies of the job's events.jsonl and output.log, as this attempt's."""
        folder = job_dir(self.local, self.spec.job_id)
        rel = attempt_dir(Path(""), self.spec.job_id, self.spec.attempt).as_posix()
        for name in (EVENTS_FILE, LOG_FILE):
            if (folder / name).is_file():
                self.store.put_file(folder / name, f"{rel}/{name}")


def _to_upload(waiting: list[Path]) -> list[Path]:
    """Of the checkpoints waiting, the newest, and before it the best one it names (KEEP_BEST) if
    that one is waiting too: a resume fetches both, and an older checkpoint is otherwise skipped."""
    if not waiting:
        return []
    newest, best = waiting[-1], evaluation.best_named(waiting[-1])
    return [f for f in waiting[:-1] if f == best and f != newest][:1] + [newest]
