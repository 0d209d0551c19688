"""The invariants a run must keep, whatever the nemesis did. Each check returns its violations,
each a dict with the invariant, the job or worker, and a sentence of detail."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tests.nemesis.faults import Fault
from tests.nemesis.history import JobHistory, Sample
from tests.nemesis.workload import JobPlan

FINAL = {"succeeded", "failed", "cancelled"}
INVARIANTS = ("terminal", "idle_worker", "models", "events", "leftovers")


def violation(invariant: str, subject: str, detail: str, **more: Any) -> dict[str, Any]:
    return {"invariant": invariant, "subject": subject, "detail": detail, **more}


def _last_events(h: JobHistory, n: int = 6) -> list[str]:
    return [f"a{e['a']} s{e['s']} {e['event'].get('kind')} {e['event'].get('message', '')[:160]}" for e in h.stream[-n:]]


def terminal(histories: dict[str, JobHistory], plans: list[JobPlan], samples: list[Sample],
             faults_end: float, bound: float, checked_at: float) -> list[dict[str, Any]]:
    """1. Every job reaches exactly one final state, within ``bound`` seconds after the faults
    stopped, with one final event that says the same, and never leaves it."""
    found = []
    for plan in plans:
        if not plan.submitted:
            continue
        h = histories[plan.id]
        if h.record is None:
            found.append(violation("terminal", plan.id, "its record is gone from Redis"))
            continue
        status = h.record.get("status")
        if status not in FINAL:
            found.append(violation("terminal", plan.id, f"still {status} {checked_at - faults_end:.0f} s after the "
                                   f"last fault ended (attempts {h.record.get('attempts')}, worker "
                                   f"{h.record.get('worker')})", events=_last_events(h)))
            continue
        finished = float(h.record.get("finished_at") or 0)
        if finished > faults_end + bound and plan.kind != "probe":  # probes start after the drain
            found.append(violation("terminal", plan.id, f"ended {finished - faults_end:.0f} s after the last fault "
                                   f"ended; the bound is {bound:.0f} s"))
        finals = [e["event"].get("kind") for e in h.stream if e["event"].get("kind") in FINAL]
        if finals != [status]:
            found.append(violation("terminal", plan.id, f"its record says {status}, its stream's final events are "
                                   f"{finals}", events=_last_events(h)))
    seen: dict[str, str] = {}
    for sample in samples:
        for job, status in sample.status.items():
            before = seen.get(job)
            if before in FINAL and status != before:
                found.append(violation("terminal", job, f"left its final state: {before}, then {status}"))
            seen[job] = status
    return found


@dataclass
class Quiet:
    """When a worker may be expected to take jobs: alive, warm, and no fault near it."""

    started: float
    ended: float
    blocked: list[tuple[float, float]] = field(default_factory=list)

    def eligible(self, t: float) -> bool:
        return self.started <= t < self.ended and not any(a <= t < b for a, b in self.blocked)


def idle_workers(samples: list[Sample], workers: dict[str, tuple[int, float, float]], faults: list[Fault],
                 bound: float, settle: float, stop_seconds: dict[str, float], queues: dict[int, set[str]],
                 stop_bound: float = 25.0) -> list[dict[str, Any]]:
    """2. No worker is idle while jobs wait for one of its queues for longer than ``bound``
    seconds, away from faults (a worker under a fault, or within ``settle`` seconds after one on
    its host or on Redis, is excused), and every worker stops within ``stop_bound`` seconds of a
    SIGTERM. ``workers``: name -> (slot, started, ended); ``queues``: slot -> the queues it takes."""
    found = []
    quiet = {}
    for name, (slot, started, ended) in workers.items():
        q = Quiet(started + settle, ended)
        for f in faults:
            if f.injected and f.started is not None and (f.kind.startswith("redis") or f.slot == slot):
                q.blocked.append((f.started, (f.ended or f.started) + settle))
        quiet[name] = q
    since: dict[str, float | None] = dict.fromkeys(workers)
    reported: set[tuple[str, float]] = set()
    last_t = 0.0
    for sample in samples:
        gap = sample.t - last_t > 5.0  # Redis did not answer for a while: start counting again
        last_t = sample.t
        for name, q in quiet.items():
            mine = sorted(j for j, queue in sample.waiting.items() if queue in queues[workers[name][0]])
            idle = q.eligible(sample.t) and bool(mine) and name not in sample.busy
            if not idle or gap:
                since[name] = sample.t if idle else None
                continue
            began = since[name]
            if began is None:
                since[name] = sample.t
            elif sample.t - began > bound and (name, began) not in reported:
                reported.add((name, began))
                found.append(violation("idle_worker", name, f"idle for over {bound:.0f} s from {began:.0f} while "
                                       f"{len(mine)} jobs waited for its queues ({', '.join(mine[:5])}); "
                                       f"busy workers: {sample.busy}", at=sample.t, waiting=mine))
    for name, seconds in stop_seconds.items():
        if seconds > stop_bound:
            found.append(violation("idle_worker", name, f"took {seconds:.0f} s to stop after SIGTERM (killed at "
                                   f"the end of its wait): it was hung"))
    return found


def models(histories: dict[str, JobHistory], plans: list[JobPlan], found_models: dict[str, Any]) -> list[dict[str, Any]]:
    """3. At most one published model per job, carrying that job's id, where its record says,
    from its last attempt, and only for a job that succeeded or was cancelled with a save."""
    out = []
    asked = {p.id: p.cancel_asked for p in plans}
    per_job: Counter[str] = Counter()
    for model in found_models["models"]:
        manifest, path = model["manifest"], model["path"]
        job = (manifest or {}).get("job")
        if not job:
            out.append(violation("models", path, "a model folder without a deepe.json naming its job"))
            continue
        per_job[job] += 1
        h = histories.get(job)
        if h is None or h.record is None:
            out.append(violation("models", job, f"{path} names a job this run does not know"))
            continue
        rec = h.record
        if rec.get("output_dir") != path:
            out.append(violation("models", job, f"its model is at {path}, its record points at {rec.get('output_dir')}"))
        status, partial = rec.get("status"), bool(manifest.get("partial"))
        if status == "cancelled" and not (asked.get(job) == "save" and partial):
            out.append(violation("models", job, f"cancelled (asked: {asked.get(job)}), yet a model "
                                 f"(partial: {partial}) was published at {path}"))
        elif status not in ("succeeded", "cancelled"):
            out.append(violation("models", job, f"{status} (error: {str(rec.get('error'))[:200]}), yet a model "
                                 f"was published at {path} by attempt {manifest.get('attempt')}"))
        elif status == "succeeded" and partial:
            out.append(violation("models", job, "succeeded, but its model is marked partial"))
        if status in FINAL and str(manifest.get("attempt")) != str(rec.get("attempts")) \
                and not _adopted(h, manifest, rec.get("attempts")):
            out.append(violation("models", job, f"its model was published by attempt {manifest.get('attempt')}, "
                                 f"the job's last attempt is {rec.get('attempts')}"))
    for job, count in per_job.items():
        if count > 1:
            out.append(violation("models", job, f"{count} published models carry its id"))
    for plan in plans:
        h = histories.get(plan.id)
        if plan.submitted and h and h.record and h.record.get("status") == "succeeded" and not per_job[plan.id]:
            out.append(violation("models", plan.id, "succeeded without a published model"))
    return out


def _adopted(h: JobHistory, manifest: dict[str, Any], last: Any) -> bool:
    """Whether the job's last attempt adopted the model an earlier one published (that attempt
    lost its worker or its end after the publish: `core.fences`), and said so in a `saving`
    event naming that attempt and its claim."""
    said = f"attempt {manifest.get('attempt')} of this job (claim {manifest.get('claim')}) already published"
    try:
        earlier = int(manifest.get("attempt") or 0) < int(last)
    except (TypeError, ValueError):
        return False
    return earlier and any(e["a"] == int(last) and e["event"].get("kind") == "saving"
                           and str(e["event"].get("message", "")).startswith(said) for e in h.stream)


def events(histories: dict[str, JobHistory]) -> list[dict[str, Any]]:
    """4. Within an attempt, no event twice and none missing: each attempt's numbers `s` run
    1, 2, 3… with no gap and no repeat, no entry of an older attempt follows a newer one, no
    step is logged twice, and a succeeded job's last attempt has in its stream every event
    its `events.jsonl` has."""
    out = []
    for job, h in histories.items():
        numbers: dict[int, list[int]] = {}
        newest = 0
        for e in h.stream:
            a, s, kind = e["a"], e["s"], e["event"].get("kind")
            if a < newest and s > 0:
                out.append(violation("events", job, f"entry {e['id']} of attempt {a} ({kind}) came after attempt "
                                     f"{newest} had started"))
            newest = max(newest, a)
            if s > 0:
                numbers.setdefault(a, []).append(s)
        for a, seq in numbers.items():
            if sorted(seq) != list(range(1, len(seq) + 1)) or seq != sorted(seq):
                repeated = sorted(n for n, c in Counter(seq).items() if c > 1)
                missing = sorted(set(range(1, max(seq) + 1)) - set(seq))
                out.append(violation("events", job, f"attempt {a}: numbers repeated {repeated[:10]}, missing "
                                     f"{missing[:10]}, out of order: {seq != sorted(seq)}"))
        out += _steps_and_copies(job, h)
    return out


def _key(e: dict[str, Any]) -> tuple[Any, ...]:
    return (e.get("attempt"), e.get("kind"), e.get("step"), e.get("ts"))


def _steps_and_copies(job: str, h: JobHistory) -> list[dict[str, Any]]:
    out = []
    in_stream = [e["event"] for e in h.stream]
    for where, evs in (("stream", in_stream), ("events.jsonl", h.jsonl)):
        twice = [k for k, c in Counter(_key(e) for e in evs if "unparsed" not in e).items() if c > 1]
        if twice:
            out.append(violation("events", job, f"{len(twice)} events twice in its {where}, e.g. {twice[0]}"))
    by_attempt: dict[Any, list[int]] = {}
    for e in in_stream:
        if e.get("kind") == "log" and "loss" in (e.get("metrics") or {}):
            by_attempt.setdefault(e.get("attempt"), []).append(int(e.get("step") or 0))
    for a, steps in by_attempt.items():
        if steps != sorted(set(steps)):
            out.append(violation("events", job, f"attempt {a} logged steps {steps}: one twice or out of order"))
    if h.record and h.record.get("status") == "succeeded":
        last = int(h.record.get("attempts") or 0)
        # By kind, step and time: the worker writes `started` to the stream before it knows its attempt.
        streamed = {_key(e)[1:] for e in in_stream}
        lost = [e for e in h.jsonl if e.get("attempt") == last and _key(e)[1:] not in streamed]
        if lost:
            out.append(violation("events", job, f"{len(lost)} events of its last attempt ({last}) are in events.jsonl "
                                 f"but not in its stream, e.g. {lost[0].get('kind')} step {lost[0].get('step')}"))
    return out


def leftovers(after_stop: list[str], faults: list[Fault], hidden: list[str]) -> list[dict[str, Any]]:
    """5. No process of the run alive once its cluster stopped, and none of a killed worker's
    processes alive 10 s after the kill. (Hidden folders are listed as notes, not violations.)"""
    out = [violation("leftovers", p.split()[0], f"alive after the cluster stopped: {p}") for p in after_stop]
    for f in faults:
        for p in f.survivors:
            out.append(violation("leftovers", p.split()[0], f"outlived its worker ({f.target}, killed) by 10 s: {p}"))
    return out
