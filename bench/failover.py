"""Redis Sentinel failover at a random moment, over many runs: no acknowledged job lost, none
trained twice at once, one model each, every step logged once.

Each run starts a fresh topology (tests/sentinel.py: a primary, 2 replicas, 3 sentinels, so
that one replica is left to acknowledge writes after the failover), one or two real workers
(`DEEPE_LEASE_TTL=10`) and submits a few real SFT jobs on the tiny model (tests/helpers.py's
SLOW_METHOD), a random gap apart. At a moment drawn uniformly over the busy period (first
submit to last job's end: during the submits, the training or the saving) the primary is
SIGKILLed; once the sentinels promote a replica, the dead host is restarted and rejoins as a
replica. At the moment of the kill one more job is submitted (the probe; `--no-probe` leaves
it out), so that every run has a submit during the outage. A submit that raises meanwhile
was not acknowledged: it is counted, and submitted again once the failover is over. The busy period is measured first, by one run without a fault per worker count, and
the kill drawn over 1.1 times it; a run whose jobs had all ended by then is not faulted, is
reported under `missed_runs` and drawn again, so that the kills fall uniformly over the real
busy periods (its busy period joins the measures, whose median is drawn from).

Figures per run, and their totals (goals in brackets):

- `acknowledged`: submits that returned; `refused`: submits that raised (retried after);
- `lost`: acknowledged jobs missing or not ending `succeeded` [0];
- `double_trainers`: jobs two attempts of which trained at overlapping times (first to last
  `log` event of each attempt, from the job's stream and its events.jsonl) [0];
- `bad_models`: jobs without exactly one published model (OUTPUT_DIR with deepe.json naming
  the job, no `.NAME.*` staged or moved-aside folder beside it) [0];
- `step_errors`: steps logged twice or missing within an attempt, in the job's stream [0];
- `follower_errors`: the same, as a follower saw them: each acknowledged job is followed from
  its submit's return by `deepe logs --follow`'s reader (`read_events(follow=True)`, run again
  from its last id if it gives up on an outage); a follower that never saw a succeeded job's
  end counts too [0];
- `refused_ran`: refused submits that trained or published anyway [0];
- `next_step_s`: the primary's death to the next training step of any job (the step's own
  time: a job trains on while Redis is away); `next_step_visible_s`: to that step reaching
  the job's stream (its entry id's time); `promoted_s`: to the sentinels naming a new primary;
  `first_ack_after_kill_s`: to the first submit acknowledged again (a replica must first
  have synced with the new primary: until then submits are refused);
- `failovers`: the switches of primary the sentinels logged (more than one: the sentinels
  failed over again, e.g. a promoted replica briefly seen as down on a loaded machine).

A violation is printed with the worker logs' lines about its job and each data server's copy
of the job's stream.

    python bench/failover.py [--runs 10] [--seed 1] [--jobs 3] [--steps 15] [--workers 1,2]
    python bench/failover.py --smoke     # 1 run, 1 job of 4 steps (and the probe), killed after step 1
    python bench/failover.py --second-failover   # and the promoted primary stopped at once: 2 failovers

Prints one JSON object (totals and `per_run`) and a table on stderr; exits 1 on a violation.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import median, report, smoke_flag

TTL = 10
REPLICAS = 2
STEP_SLEEP = 0.3
SUBMIT_GAP_S = 6.0  # each submit waits up to this long after the previous one, at random
JOB_TIMEOUT_S = 300.0  # after the failover, for every acknowledged job to end
BUSY_MARGIN = 1.1  # the kill is drawn over the calibrated busy period this much longer (it varies)
RETRY_FOR_S = 120.0  # a refused submit is tried again for this long
LOG_LINES = 40  # of each worker's log, per violation
STALL_S = 20  # DEEPE_CONSUMER_STALL_TIMEOUT of the workers: an idle consumer that takes nothing exits
EXIT_STUCK = 70  # a worker's "restart me" exit (deepe_tasks.worker.watchdog.EXIT_STUCK)


class Supervisor:
    """What a restart policy (Docker's, systemd's, a Deployment's) does for the bench's workers:
    one that exits with code 70 (it found itself stuck) is started again, and counted."""

    def __init__(self, workers: list[Any], notes: list[str]) -> None:
        self.workers, self.notes, self.restarts = workers, notes, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-supervisor", daemon=True)

    def start(self) -> Supervisor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            for i, w in enumerate(self.workers):
                if w.proc is not None and w.proc.poll() == EXIT_STUCK and not self._stop.is_set():
                    self.restarts += 1
                    self.notes.append(f"worker {i} exited with code {EXIT_STUCK} (stuck) and was restarted")
                    w.start()


@dataclass
class Plan:
    """What one run does, drawn from its seed."""

    seed: int
    workers: int
    jobs: int
    steps: int
    gaps: list[float]
    kill_at_s: float | None  # after the first submit; None: no fault (a calibration run)
    kill_after_first_step: bool = False  # the smoke's: a fault, at a fixed moment
    kill_u: float = 0.0  # where in the busy period the kill falls, from 0 to 1
    probe: bool = True  # one more submit at the moment of the kill, into the outage
    second_failover: bool = False  # the promoted primary paused past down-after: a second failover


@dataclass
class Submitted:
    """A submit and what it gave."""

    slot: int
    job_id: str
    output: Path
    retry: int  # 0 for the first try of this slot
    acknowledged: bool
    at: float
    error: str = ""
    ended: float = 0.0  # when the submit returned or raised


class Follow:
    """`deepe logs --follow`'s reader on one job, from its submit's return to its final event;
    run again from the last event it showed when it gives up on an outage, as a user would."""

    def __init__(self, job_id: str, stop: threading.Event) -> None:
        self.job_id = job_id
        self.events: list[dict[str, Any]] = []
        self.ended = False
        self.restarts = 0
        self._stop = stop
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        from deepe_tasks.core.connection import get_redis
        from deepe_tasks.core.events import read_events

        since = "0"
        while not self._stop.is_set():
            try:
                for e in read_events(get_redis(), self.job_id, since=since, follow=True):
                    since = e.id or since
                    self.events.append({**json.loads(e.to_json()), "id": e.id})
                    if e.kind.is_final:
                        self.ended = True
                        return
            except Exception:  # an outage past the reader's patience: follow again from `since`
                self.restarts += 1
                time.sleep(1.0)


@dataclass
class Submitter:
    """Submits a run's jobs on its own thread, so that the primary can die in the middle; a
    refused submit is tried again (a new job id and output folder), once the failover is over,
    until one is acknowledged. `probe` submits one more job at once (into the outage)."""

    plan: Plan
    method: str
    params: dict[str, Any]
    models: Path
    queue: str
    done: list[Submitted] = field(default_factory=list)
    started_at: float | None = None
    in_call: int = 0
    pending: int = 0
    threads: list[threading.Thread] = field(default_factory=list)
    first_submit: threading.Event = field(default_factory=threading.Event)
    settled: threading.Event = field(default_factory=threading.Event)  # set once the failover is over
    followers: dict[str, Follow] = field(default_factory=dict)  # the acknowledged jobs, by id
    stop_following: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Submitter:
        self.pending = self.plan.jobs
        self._spawn(self._run)
        return self

    def probe(self) -> None:
        self._spawn(lambda: self._submit(self.plan.jobs, "probe"))

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def _spawn(self, target: Any) -> None:
        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        self.threads.append(thread)

    def _try(self, slot: int, name: str, retry: int) -> Submitted:
        from deepe_tasks import submit

        job_id = uuid.uuid4().hex
        output = self.models / (name + (f"-retry{retry}" if retry else ""))
        with self.lock:
            self.in_call += 1
        at = time.time()
        if self.started_at is None:
            self.started_at = at
            self.first_submit.set()
        try:
            submit(self.method, {**self.params, "OUTPUT_DIR": str(output)}, queue=self.queue, job_id=job_id)
            self.followers[job_id] = Follow(job_id, self.stop_following)
            return Submitted(slot, job_id, output, retry, True, at, ended=time.time())
        except Exception as e:  # a failover under way: any error, the job is not acknowledged
            return Submitted(slot, job_id, output, retry, False, at, f"{type(e).__name__}: {e}"[:300], time.time())
        finally:
            with self.lock:
                self.in_call -= 1

    def _submit(self, slot: int, name: str) -> None:
        retry, deadline = 0, time.monotonic() + RETRY_FOR_S
        while True:
            result = self._try(slot, name, retry)
            self.done.append(result)
            if result.acknowledged or time.monotonic() > deadline:
                return
            self.settled.wait(timeout=RETRY_FOR_S)
            retry += 1
            time.sleep(1.0)

    def _run(self) -> None:
        for slot, gap in enumerate(self.plan.gaps):
            time.sleep(gap)
            self._submit(slot, f"job-{slot}")
            self.pending -= 1


def job_events(storage: Path, job_id: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The job's events in its Redis stream, and in its folder's events.jsonl."""
    from deepe_tasks.core.connection import get_redis
    from deepe_tasks.core.events import read_events

    stream = [{**json.loads(e.to_json()), "id": e.id} for e in read_events(get_redis(), job_id)]
    path = storage / "jobs" / job_id / "events.jsonl"
    jsonl = []
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            try:
                jsonl.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by a crash
    return stream, jsonl


def steps(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The training steps among events (a `log` event with a loss)."""
    return [e for e in events if e.get("kind") == "log" and e.get("step") is not None
            and "loss" in (e.get("metrics") or {}) and e.get("attempt")]


def step_errors(stream: list[dict[str, Any]], max_steps: int) -> tuple[int, dict[int, list[int]]]:
    """Steps logged twice or missing within an attempt (the first attempt starts at step 1, the
    last one reaches the end); and the steps by attempt."""
    by_attempt: dict[int, list[int]] = {}
    for e in steps(stream):
        by_attempt.setdefault(int(e["attempt"]), []).append(int(e["step"]))
    errors = 0
    for attempt, seen in by_attempt.items():
        errors += len(seen) - len(set(seen))  # twice
        errors += max(seen) - min(seen) + 1 - len(set(seen))  # holes
        errors += sum(1 for a, b in zip(seen, seen[1:]) if b < a)  # out of order
        if attempt == min(by_attempt):
            errors += min(seen) - 1
    if by_attempt:
        errors += max(0, max_steps - max(by_attempt[max(by_attempt)]))
    else:
        errors += max_steps
    return errors, by_attempt


def overlap(events: list[dict[str, Any]]) -> float | None:
    """The longest time two attempts of one job both trained (> 0: a double trainer); None when
    only one attempt trained."""
    spans: dict[int, tuple[float, float]] = {}
    for e in steps(events):
        a, ts = int(e["attempt"]), float(e["ts"])
        lo, hi = spans.get(a, (ts, ts))
        spans[a] = (min(lo, ts), max(hi, ts))
    worst = None
    ordered = sorted(spans.values())
    for i, (lo_a, hi_a) in enumerate(ordered):
        for lo_b, hi_b in ordered[i + 1:]:
            both = min(hi_a, hi_b) - max(lo_a, lo_b)
            worst = both if worst is None else max(worst, both)
    return worst


def model_check(output: Path, job_id: str) -> tuple[int, list[str]]:
    """1 when OUTPUT_DIR holds this job's published model (0 otherwise), and the staged or
    moved-aside folders left beside it."""
    leftovers = sorted(p.name for p in output.parent.glob(f".{output.name}.*")) if output.parent.exists() else []
    try:
        manifest = json.loads((output / "deepe.json").read_text())
    except (OSError, ValueError):
        return 0, leftovers
    return (1 if manifest.get("job") == job_id else 0), leftovers


def phase(sub: Submitter, acknowledged: list[Submitted]) -> tuple[str, dict[str, int]]:
    """What the run was doing: a submit in flight, else the busiest job state, and the count of
    jobs in each state (from each job's last event)."""
    from deepe_tasks.core.connection import get_redis
    from deepe_tasks.core.events import read_events

    names = {"queued": "queued", "started": "starting", "loading_model": "starting",
             "loading_dataset": "starting", "training": "training", "log": "training", "checkpoint": "training",
             "resumed": "training", "requeued": "queued", "saving": "saving"}
    states: Counter[str] = Counter()
    for s in acknowledged:
        try:
            events = list(read_events(get_redis(), s.job_id))
        except Exception:
            states["unknown"] += 1
            continue
        last = events[-1].kind.value if events else "queued"
        states[names.get(last, "done")] += 1
    if sub.pending:
        states["not_submitted"] += sub.pending - sub.in_call
    label = "submit" if sub.in_call else next(
        (s for s in ("saving", "training", "starting", "queued", "not_submitted") if states.get(s)), "idle")
    return label, dict(states)


def final_status(job_id: str) -> str | None:
    """The job's status once final, "missing" without a record, None while it runs or Redis is away."""
    from deepe_tasks.core import jobstore
    from deepe_tasks.core.connection import get_redis
    from deepe_tasks.core.errors import JobNotFound

    try:
        status = jobstore.status(get_redis(), job_id)
    except JobNotFound:
        return "missing"
    except Exception:
        return None
    return status.value if status.is_final else None


def log_lines(logs: list[Path], job_id: str | None) -> list[str]:
    """A worker log's lines about one job (or, without one, its errors), for a violation's report."""
    wanted = re.compile(re.escape(job_id) if job_id else r"ERROR|CRITICAL|Traceback")
    out = []
    for log in logs:
        if log.exists():
            lines = [f"{log.name}: {line}" for line in log.read_text(errors="replace").splitlines()
                     if wanted.search(line)]
            out += lines[-LOG_LINES:]
    return out


def servers_view(topo: Any, job_id: str) -> dict[str, Any]:
    """Each data server's role and its copy of the job's stream (the steps, by attempt), for a
    violation's report: which server has the events the reader did not see."""
    from deepe_tasks.core import keys

    out: dict[str, Any] = {}
    for port in topo.server_ports():
        client = topo.client(port)
        try:
            entries = client.xrange(keys.events(job_id))
            found = []
            for _, fields in entries:
                e = json.loads(fields.get("data", "{}"))
                if e.get("kind") == "log" and "loss" in (e.get("metrics") or {}):
                    found.append(f"{e.get('attempt')}:{e.get('step')}(s={fields.get('s')})")
            out[str(port)] = {"role": topo.role(port), "entries": len(entries), "steps": found}
        except Exception as e:
            out[str(port)] = {"error": f"{type(e).__name__}: {e}"}
        finally:
            client.close()
    return out


def missing_from_stream(stream: list[dict[str, Any]], jsonl: list[dict[str, Any]]) -> list[str]:
    """The events of events.jsonl that the stream lacks (kind, step, attempt, time)."""
    have = {(e.get("kind"), e.get("step"), e.get("attempt"), round(float(e["ts"]), 3)) for e in stream}
    return [f"{e.get('kind')} step {e.get('step')} attempt {e.get('attempt')} at {float(e['ts']):.3f}"
            for e in jsonl if (e.get("kind"), e.get("step"), e.get("attempt"), round(float(e["ts"]), 3)) not in have]


def one_run(n: int, name: str, plan: Plan, work: Path, storage: Path, method: str, params: dict[str, Any]) -> dict[str, Any]:
    from deepe_tasks.core.settings import get_settings
    from deepe_tasks.fixtures.embedded import WorkerProcess
    from tests.helpers import wait_for
    from tests.sentinel import FORCED_FAILOVER_PAUSE_S, Topology, TopologyTimeout

    begun = time.monotonic()
    folder = work / name
    notes: list[str] = []
    topo = Topology(folder / "redis", replicas=REPLICAS).start()
    os.environ.update({"DEEPE_REDIS_URL": topo.url, "DEEPE_REDIS_SENTINEL_MASTER": topo.master_name})
    get_settings.cache_clear()
    queue = f"fo-{name}"
    logs = [folder / f"worker{i}.log" for i in range(plan.workers)]
    workers = [WorkerProcess({"DEEPE_LEASE_TTL": str(TTL), "DEEPE_CONSUMER_STALL_TIMEOUT": str(STALL_S)},
                             queues=queue, log_file=log) for log in logs]
    supervisor = Supervisor(workers, notes)
    sub = Submitter(plan, method, {**params, "MAX_STEPS": plan.steps, "step_sleep": STEP_SLEEP},
                    storage / "models" / name, queue)
    killed_at: float | None = None
    promoted_s: float | None = None
    label, states = "none", dict[str, int]()
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.wait_ready(timeout=120)
        supervisor.start()
        sub.start()
        sub.first_submit.wait(timeout=60)
        assert sub.started_at is not None
        if plan.kill_at_s is not None or plan.kill_after_first_step:
            if plan.kill_after_first_step:
                def stepped() -> bool:
                    return any(steps(job_events(storage, s.job_id)[0]) for s in sub.done if s.acknowledged)
                wait_for(stepped, timeout=240, interval=0.1)
            else:
                assert plan.kill_at_s is not None
                time.sleep(max(0.0, sub.started_at + plan.kill_at_s - time.time()))
            label, states = phase(sub, [s for s in list(sub.done) if s.acknowledged])
        if label != "idle" and label != "none":
            old = topo.primary_port()
            killed_at = time.time()
            topo.kill(old)
            if plan.probe:
                sub.probe()
            try:
                new = topo.wait_for_new_primary(old, timeout=60)
                promoted_s = round(time.time() - killed_at, 2)
                if not plan.second_failover:
                    sub.settled.set()
                # The dead host comes back, empty (no AOF), as a replica of the new primary.
                topo.restart(old)
                if plan.second_failover:
                    # The promoted primary stops answering past down-after: the sentinels fail over
                    # again, and it comes back a primary that is one no more, until they tell it.
                    topo.pause(new)
                    time.sleep(FORCED_FAILOVER_PAUSE_S)
                    topo.resume(new)
                    topo.wait_for_new_primary(new, timeout=60)
                    sub.settled.set()
                topo.wait_settled(timeout=120)
            except TopologyTimeout as e:
                notes.append(f"topology: {str(e).splitlines()[0]}")
        sub.settled.set()
        sub.join(timeout=RETRY_FOR_S + 60)
        acked = [s for s in sub.done if s.acknowledged]
        deadline = time.monotonic() + JOB_TIMEOUT_S
        statuses: dict[str, str | None] = {s.job_id: None for s in acked}
        while time.monotonic() < deadline and any(v is None for v in statuses.values()):
            for job_id, v in statuses.items():
                if v is None:
                    statuses[job_id] = final_status(job_id)
            time.sleep(0.5)
        refused = [s for s in sub.done if not s.acknowledged]
        result = evaluate(n, plan, sub, acked, refused, statuses, storage, logs, killed_at, promoted_s, label,
                          states, notes, begun)
        result["failovers"] = topo.switches()
        result["worker_restarts"] = supervisor.restarts
        for d in result["details"]:
            if d["job"]:
                d["servers"] = servers_view(topo, d["job"])
        return result
    finally:
        sub.stop_following.set()
        supervisor.stop()
        for w in workers:
            w.signal(signal.SIGTERM)  # all at once: they stop side by side
        for w in workers:
            w.stop(timeout=30)
        topo.stop()


def evaluate(n: int, plan: Plan, sub: Submitter, acked: list[Submitted], refused: list[Submitted],
             statuses: dict[str, str | None], storage: Path, logs: list[Path], killed_at: float | None,
             promoted_s: float | None, label: str, states: dict[str, int], notes: list[str],
             begun: float) -> dict[str, Any]:
    """The run's figures and violations, from the jobs' records, events and storage."""
    lost = double = bad_models = bad_steps = refused_ran = follower_errors = 0
    details: list[dict[str, Any]] = []
    worst_overlap: float | None = None
    after_kill: list[float] = []
    visible: list[float] = []  # the same steps, by when they reached the stream (its entry id's time)
    ends: list[float] = []
    per_job: list[dict[str, Any]] = []
    for s in acked:
        status = statuses.get(s.job_id) or "running"
        stream, jsonl = job_events(storage, s.job_id)
        errors, by_attempt = step_errors(stream, plan.steps)
        both = stream + jsonl
        both_over = overlap(both)
        models, leftovers = model_check(s.output, s.job_id)
        ends += [float(e["ts"]) for e in stream if e.get("kind") in ("succeeded", "failed", "cancelled")]
        if killed_at is not None:
            after_kill += [float(e["ts"]) - killed_at for e in steps(both) if float(e["ts"]) > killed_at]
            visible += [int(str(e["id"]).split("-")[0]) / 1000 - killed_at for e in steps(stream)
                        if float(e["ts"]) > killed_at and e.get("id")]
        if both_over is not None:
            worst_overlap = both_over if worst_overlap is None else max(worst_overlap, both_over)
        broken = []
        if status != "succeeded":
            lost += 1
            broken.append(f"ended {status}")
        if both_over is not None and both_over > 0:
            double += 1
            broken.append(f"two attempts trained at once for {both_over:.2f} s")
        if models != 1 or leftovers:
            bad_models += 1
            broken.append(f"models {models}, leftovers {leftovers}")
        if errors:
            bad_steps += errors
            broken.append(f"{errors} steps logged twice or missing: {by_attempt}; in events.jsonl, not in the "
                          f"stream: {missing_from_stream(stream, jsonl)}")
        follower = sub.followers.get(s.job_id)
        if follower is not None and (follower.ended or status == "succeeded"):
            seen_errors, seen = step_errors(follower.events, plan.steps)
            seen_errors += 0 if follower.ended else 1
            if seen_errors:
                follower_errors += seen_errors
                broken.append(f"a follower saw steps {seen} (ended: {follower.ended}, restarted "
                              f"{follower.restarts} times)")
        per_job.append({"job": s.job_id, "slot": s.slot, "retry": s.retry, "status": status,
                        "attempts": sorted(by_attempt), "models": models, "steps_by_attempt": by_attempt})
        if broken:
            details.append({"job": s.job_id, "broken": broken, "log": log_lines(logs, s.job_id)})
    for s in refused:
        stream, jsonl = job_events(storage, s.job_id)
        models, _ = model_check(s.output, s.job_id)
        if steps(stream + jsonl) or models:
            refused_ran += 1
            details.append({"job": s.job_id, "broken": [f"refused ({s.error}) but trained or published"],
                            "log": log_lines(logs, s.job_id)})
    acks = [s.ended for s in acked if killed_at is not None and s.at > killed_at]
    if details:
        details.append({"job": None, "broken": ["worker errors"], "log": log_lines(logs, None)})
    assert sub.started_at is not None
    start = sub.started_at
    return {
        "run": n, "seed": plan.seed, "workers": plan.workers, "jobs": plan.jobs, "steps": plan.steps,
        "acknowledged": len(acked), "refused": len(refused), "retried": sum(1 for s in acked if s.retry),
        "refused_errors": [s.error for s in refused],
        "probe": ", ".join(("acknowledged" if s.acknowledged else "refused") + (f" (retry {s.retry})" if s.retry else "")
                           for s in sub.done if s.slot == plan.jobs) or None,
        "lost": lost, "double_trainers": double, "bad_models": bad_models, "step_errors": bad_steps,
        "refused_ran": refused_ran, "follower_errors": follower_errors,
        "follower_restarts": sum(f.restarts for f in sub.followers.values()),
        "violations": lost + double + bad_models + bad_steps + refused_ran + follower_errors,
        "max_attempt_overlap_s": None if worst_overlap is None else round(worst_overlap, 3),
        "kill_at_s": None if killed_at is None else round(killed_at - start, 2),
        "busy_s": round(max(ends) - start, 2) if ends else None,
        "phase_at_kill": label, "states_at_kill": states,
        # Every job had ended before the drawn moment: no fault; the run is drawn again.
        "missed": label == "idle",
        "promoted_s": promoted_s,
        "next_step_s": round(min(after_kill), 2) if after_kill else None,
        "next_step_visible_s": round(min(visible), 2) if visible else None,
        # Until a submit is acknowledged again: a replica must have synced with the new primary.
        "first_ack_after_kill_s": round(min(acks) - killed_at, 2) if killed_at is not None and acks else None,
        "attempts": [len(j["attempts"]) for j in per_job],
        "duration_s": round(time.monotonic() - begun, 1),
        "jobs_detail": per_job, "notes": notes, "details": details,
    }


def failed_run(n: int, plan: Plan, error: str) -> dict[str, Any]:
    """A run that could not be carried out (its topology or workers did not come up): no figures."""
    return {"run": n, "seed": plan.seed, "workers": plan.workers, "jobs": plan.jobs, "steps": plan.steps,
            "acknowledged": 0, "refused": 0, "retried": 0, "refused_errors": [], "probe": None, "lost": 0, "double_trainers": 0,
            "bad_models": 0, "step_errors": 0, "refused_ran": 0, "follower_errors": 0, "follower_restarts": 0,
            "violations": 0, "max_attempt_overlap_s": None,
            "kill_at_s": plan.kill_at_s, "busy_s": None, "phase_at_kill": "error", "states_at_kill": {}, "missed": False,
            "promoted_s": None, "next_step_s": None, "next_step_visible_s": None, "first_ack_after_kill_s": None,
            "attempts": [], "duration_s": None,
            "jobs_detail": [],
            "notes": [], "details": [], "failovers": [], "worker_restarts": 0, "error": error[:2000]}


def table(runs: list[dict[str, Any]]) -> str:
    head = (f"{'run':>3} {'seed':>5} {'wk':>2} {'ack':>3} {'ref':>3} {'kill_s':>6} {'busy_s':>6} {'phase':<9}"
            f"{'promo_s':>7} {'fo':>2} {'next_s':>6} {'seen_s':>6} {'ack_s':>6} {'lost':>4} {'dbl':>3} {'mdl':>3} {'stp':>3} {'fol':>3} {'ran':>3} attempts")
    lines = [head]
    for r in runs:
        def f(v: Any) -> str:
            return "-" if v is None else f"{v:.1f}"
        lines.append(f"{r['run']:>3} {r['seed']:>5} {r['workers']:>2} {r['acknowledged']:>3} {r['refused']:>3} "
                     f"{f(r['kill_at_s']):>6} {f(r['busy_s']):>6} {r['phase_at_kill']:<9}{f(r['promoted_s']):>7} {len(r.get('failovers', [])):>2} "
                     f"{f(r['next_step_s']):>6} {f(r['next_step_visible_s']):>6} {f(r['first_ack_after_kill_s']):>6} {r['lost']:>4} {r['double_trainers']:>3} {r['bad_models']:>3} "
                     f"{r['step_errors']:>3} {r['follower_errors']:>3} {r['refused_ran']:>3} {r['attempts']}")
    return "\n".join(lines)


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="runs, each on a fresh topology (default 10)")
    parser.add_argument("--seed", type=int, default=1, help="the first run's seed; run n has seed + n (default 1)")
    parser.add_argument("--jobs", type=int, default=3, help="jobs per run (default 3)")
    parser.add_argument("--steps", type=int, default=15, help=f"steps per job, {STEP_SLEEP} s each (default 15)")
    parser.add_argument("--workers", default="1,2", help="worker counts to draw from, per run (default 1,2)")
    parser.add_argument("--busy", type=float, default=None,
                        help="the busy period to draw the kill from, in seconds (default: measured first)")
    parser.add_argument("--no-probe", action="store_true",
                        help="no extra submit at the moment of the kill (by default one, into the outage)")
    parser.add_argument("--second-failover", action="store_true",
                        help="after each promotion, stop the new primary past down-after: the sentinels fail "
                             "over again, and it serves its clients as a stale primary until they demote it")
    smoke_flag(parser, "1 run, 1 job of 4 steps (and the probe's), 1 worker, the primary killed after the first step")
    return parser.parse_args()


def main() -> int:
    args = arguments()
    work = Path(tempfile.mkdtemp(prefix="deepe-bench-failover-"))
    storage = work / "storage"
    os.environ.update({"DEEPE_STORAGE": str(storage), "DEEPE_METHOD_STORE": str(work / "methods"),
                       "DEEPE_LEASE_TTL": str(TTL), "TOKENIZERS_PARALLELISM": "false",
                       "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    from deepe_tasks.fixtures import tiny
    from tests.helpers import SLOW_METHOD

    (work / "methods").mkdir(parents=True)
    (work / "methods" / "failover_sft.py").write_text(SLOW_METHOD)
    model = tiny.cached_model(storage / "base" / "tiny-llama")
    data = tiny.write_jsonl(tiny.sft_rows(64), storage / "data" / "colors.jsonl")
    params = {"MODEL_PATH": str(model), "DATASET_PATH": str(data), "BATCH_SIZE": 4, "MAX_SEQ_LENGTH": 64,
              "LORA_RANK": 4, "LEARNING_RATE": 5e-3, "PromptInputColumn": "instruction",
              "PromptOutputColumn": "output"}
    counts = [int(c) for c in args.workers.split(",")]

    def plan(seed: int, workers: int | None = None, kill_at: float | None = None) -> Plan:
        rng = random.Random(seed)
        if args.smoke:
            return Plan(seed, 1, 1, 4, [0.0], None, kill_after_first_step=True, probe=not args.no_probe,
                        second_failover=args.second_failover)
        w = rng.choice(counts)  # drawn always: a calibration run has the gaps of the run it measures for
        w = workers or w
        gaps = [0.0] + [rng.uniform(0, SUBMIT_GAP_S) for _ in range(args.jobs - 1)]
        return Plan(seed, w, args.jobs, args.steps, gaps, kill_at, kill_u=rng.random(), probe=not args.no_probe,
                    second_failover=args.second_failover)

    calibration: dict[int, float] = {}
    samples: dict[int, list[float]] = {}  # busy periods without a fault, by worker count
    calibration_runs: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    wanted = 1 if args.smoke else args.runs
    missed: list[dict[str, Any]] = []
    n = -1
    while len(runs) < wanted and n + 1 < 2 * wanted:  # a missed run is drawn again, up to `wanted` times
        n += 1
        p = plan(args.seed + n)
        if not args.smoke:
            if args.busy is not None:
                calibration[p.workers] = args.busy
            if p.workers not in calibration:
                # No fault: how long this workload keeps the workers busy, to draw the kill from.
                cal = one_run(-1, f"calibration-{p.workers}", plan(args.seed + n, p.workers), work, storage,
                              "failover_sft", params)
                print(table([cal]), file=sys.stderr, flush=True)
                calibration_runs.append(cal)
                samples[p.workers] = [float(cal["busy_s"] or 30.0)]
                calibration[p.workers] = samples[p.workers][0]
            p.kill_at_s = round(p.kill_u * BUSY_MARGIN * calibration[p.workers], 2)
        try:
            result = one_run(n, f"run-{n}", p, work, storage, "failover_sft", params)
        except Exception as e:  # one broken run (a topology that never settled) costs one run only
            result = failed_run(n, p, f"{type(e).__name__}: {e}")
        (missed if result["missed"] else runs).append(result)
        if result["missed"] and result["busy_s"] and args.busy is None:
            # A run without a fault measured the busy period once more: draw from their median.
            samples[p.workers].append(float(result["busy_s"]))
            calibration[p.workers] = round(median(samples[p.workers]), 2)
        print(table([result]) + (f"\n  error: {result['error']}" if result.get("error") else ""),
              file=sys.stderr, flush=True)
        for d in result["details"]:
            print(f"VIOLATION seed {result['seed']} job {d['job']}: {d['broken']}\n  failovers: "
                  f"{result['failovers']}; servers: {d.get('servers')}\n  " + "\n  ".join(d["log"]),
                  file=sys.stderr, flush=True)
    # A missed run had no fault, but its jobs are checked all the same: its violations count.
    totals = {k: sum(r[k] for r in runs + missed) for k in ("acknowledged", "refused", "retried", "lost", "double_trainers",
                                                  "bad_models", "step_errors", "follower_errors", "follower_restarts",
                                                  "refused_ran", "violations")}
    totals["errors"] = sum(1 for r in runs + missed if r.get("error"))
    totals["runs_with_two_failovers"] = sum(1 for r in runs if len(r.get("failovers", [])) > 1)
    totals["worker_restarts"] = sum(r.get("worker_restarts", 0) for r in runs + missed)
    nexts = [r["next_step_s"] for r in runs if r["next_step_s"] is not None]
    seen = [r["next_step_visible_s"] for r in runs if r["next_step_visible_s"] is not None]
    first_acks = [r["first_ack_after_kill_s"] for r in runs if r["first_ack_after_kill_s"] is not None]
    promos = [r["promoted_s"] for r in runs if r["promoted_s"] is not None]
    report("failover", {
        "runs": len(runs), "seed": args.seed, "second_failover": args.second_failover, "lease_ttl_s": TTL, "replicas": REPLICAS, **totals,
        "phases_at_kill": dict(Counter(r["phase_at_kill"] for r in runs)),
        "next_step_s_median": round(median(nexts), 2) if nexts else None, "next_step_s_max": max(nexts) if nexts else None,
        "next_step_visible_s_median": round(median(seen), 2) if seen else None,
        "next_step_visible_s_max": max(seen) if seen else None,
        "first_ack_after_kill_s_median": round(median(first_acks), 2) if first_acks else None,
        "first_ack_after_kill_s_max": max(first_acks) if first_acks else None,
        "promoted_s_median": round(median(promos), 2) if promos else None, "promoted_s_max": max(promos) if promos else None,
        "busy_s_calibrated": {str(k): v for k, v in calibration.items()},
        "busy_s_samples": {str(k): v for k, v in samples.items()},
        "calibration": [{k: v for k, v in c.items() if k != "jobs_detail"} for c in calibration_runs],
        "missed": len(missed), "work": str(work), "per_run": runs, "missed_runs": missed,
    }, smoke=args.smoke)
    print("\n" + table(runs), file=sys.stderr)
    print(f"totals: {totals}", file=sys.stderr)
    return 1 if totals["violations"] or totals["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
