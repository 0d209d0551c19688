"""The workload: many short real training jobs, some cancelled, some cancelled with a save, and a
merge or two, submitted through deepe's own client while the nemesis strikes.

Every call the client makes may meet a paused or restarting Redis; each is retried for a
while. A submit whose answer was lost may still have recorded the job: it is looked up by its
id (the harness chooses ids) before it is sent again.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from deepe_tasks import JobStatus
from deepe_tasks.core import keys
from deepe_tasks.core.connection import get_redis
from deepe_tasks.core.errors import DeepeError, InvalidJobState
from deepe_tasks.queue.client import Job, merge, submit

T = TypeVar("T")
RETRY_FOR = 40.0  # seconds a call is retried while Redis is away


@dataclass
class JobPlan:
    """One job of the workload, as drawn and as it went from the client's side."""

    id: str
    at: float  # seconds after the start of the run
    steps: int
    step_sleep: float
    queue: str = ""
    action: str = "none"  # "cancel", "cancel_save" or "none"
    action_after: float = 0.0  # seconds after its submit
    kind: str = "train"  # "train", "merge", or "probe" (a job for one worker, once the faults ended)
    merged_from: str | None = None
    submitted: bool = False
    submit_error: str = ""
    cancel_asked: str | None = None  # "cancel" or "save", once the client asked
    cancel_answer: str = ""

    def row(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Workload:
    """The jobs of a run, and the thread that submits and cancels them on time."""

    tag: str
    method: str
    params: dict[str, Any]
    jobs: list[JobPlan]
    merges: list[float]  # moments of the merges (seconds after the start)
    rng: random.Random
    done: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)
    errors: list[str] = field(default_factory=list)

    @classmethod
    def draw(cls, rng: random.Random, tag: str, method: str, queues: list[str], params: dict[str, Any], n: int,
             merges: int, window: float) -> Workload:
        """``queues``: the shared queue first, then each worker's own (a job there waits for it alone)."""
        jobs = []
        for i in range(n):
            queue = queues[0] if rng.random() < 0.7 or len(queues) == 1 else rng.choice(queues[1:])
            # A burst first (a queue that waits: an idle worker shows), then a steady trickle.
            at = rng.uniform(0, 4) if i < n * 0.3 else rng.uniform(0, window * 0.85)
            action = rng.choices(["none", "cancel", "cancel_save"], [0.6, 0.2, 0.2])[0]
            jobs.append(JobPlan(id=f"nem-{tag}-{i:03d}", at=round(at, 2), steps=rng.randint(4, 8),
                                step_sleep=round(rng.uniform(0.15, 0.4), 2), queue=queue, action=action,
                                action_after=round(rng.uniform(1.0, 14.0), 2)))
        moments = sorted(rng.uniform(window * 0.45, window * 0.85) for _ in range(merges))
        return cls(tag, method, params, sorted(jobs, key=lambda j: j.at), moments, rng)

    def start(self, t0: float) -> threading.Thread:
        thread = threading.Thread(target=self._run, args=(t0,), name="workload", daemon=True)
        thread.start()
        return thread

    def _run(self, t0: float) -> None:
        try:
            agenda: list[tuple[float, str, JobPlan | None]] = [(j.at, "submit", j) for j in self.jobs]
            agenda += [(m, "merge", None) for m in self.merges]
            agenda.sort(key=lambda item: item[0])
            while agenda and not self.stop.is_set():
                at, what, job = agenda.pop(0)
                if self.stop.wait(max(0.0, t0 + at - time.time())):
                    return
                if what == "submit" and job is not None:
                    self._submit(job)
                    if job.submitted and job.action != "none":
                        agenda.append((time.time() - t0 + job.action_after, "cancel", job))
                        agenda.sort(key=lambda item: item[0])
                elif what == "cancel" and job is not None:
                    self._cancel(job)
                elif what == "merge":
                    self._merge()
        except Exception as e:  # the harness's own trouble: reported, and the run goes on to its checks
            self.errors.append(f"workload: {e!r}")
        finally:
            self.done.set()

    def _submit(self, job: JobPlan) -> None:
        out = f"nemesis/{self.tag}/{job.id}"
        params = {**self.params, "MAX_STEPS": job.steps, "step_sleep": job.step_sleep, "OUTPUT_DIR": out}

        def once() -> None:
            if get_redis().exists(keys.job(job.id)):
                return  # an earlier try recorded it, and its answer was lost
            submit(self.method, params, job_id=job.id, queue=job.queue)

        job.submitted, job.submit_error = _retrying(once, "submit")

    def probe(self, queues: list[str]) -> list[JobPlan]:
        """One short job on each of ``queues`` (each worker's own), now: every worker must take its own."""
        probes = [JobPlan(id=f"nem-{self.tag}-probe{i}", at=0.0, steps=2, step_sleep=0.1, queue=q, kind="probe")
                  for i, q in enumerate(queues)]
        for job in probes:
            self._submit(job)
        self.jobs.extend(probes)
        return probes

    def _cancel(self, job: JobPlan) -> None:
        save = job.action == "cancel_save"
        answer: list[str] = []

        def once() -> None:
            try:
                answer.append(Job(job.id).cancel(save=save).value)
            except InvalidJobState as e:  # it ended first
                answer.append(f"refused: {e}")

        job.cancel_asked = "save" if save else "cancel"
        ok, error = _retrying(once, "cancel")
        job.cancel_answer = answer[-1] if answer else error

    def _merge(self) -> None:
        client = get_redis()
        merged = {j.merged_from for j in self.jobs}
        done = [j for j in self.jobs if j.kind == "train" and j.submitted and j.cancel_asked is None
                and j.id not in merged]
        try:
            succeeded = [j for j in done if client.hget(keys.job(j.id), "status") == JobStatus.SUCCEEDED.value]
        except Exception as e:
            self.errors.append(f"merge skipped: Redis did not answer ({e!r})")
            return
        if not succeeded:
            self.errors.append("merge skipped: no job had succeeded yet")
            return
        source = self.rng.choice(succeeded)
        made: list[str] = []

        def once() -> None:
            # A merge's id is drawn inside `merge`: after a lost answer, find it rather than merge twice.
            made.extend(_merges_of(client, source.id))
            if not made:
                made.append(merge(source.id).id)

        ok, error = _retrying(once, "merge")
        self.jobs.append(JobPlan(id=made[0] if made else "", at=0.0, steps=0, step_sleep=0.0, kind="merge",
                                 merged_from=source.id, submitted=ok and bool(made), submit_error=error))


def _merges_of(client: Any, source: str) -> list[str]:
    ids = client.zrange(keys.by_method("merge"), 0, -1)
    return [i for i in ids if source in (client.hget(keys.job(i), "params") or "")]


def _retrying(call: Callable[[], T], what: str) -> tuple[bool, str]:
    """Call until it succeeds or ``RETRY_FOR`` seconds passed: (succeeded, the last error)."""
    deadline = time.monotonic() + RETRY_FOR
    error = ""
    while True:
        try:
            call()
            return True, ""
        except InvalidJobState as e:
            return False, f"{what}: {e}"
        except (DeepeError, OSError, Exception) as e:  # Redis or the broker away: try again
            error = f"{what}: {type(e).__name__}: {e}"
            if time.monotonic() > deadline:
                return False, error
            time.sleep(0.5)


def write_method(store: Path, name: str, source: str) -> str:
    (store / f"{name}.py").write_text(source)
    return name
