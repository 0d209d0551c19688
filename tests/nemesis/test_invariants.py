"""The nemesis's checks can fail: each is fed a history with the defect it looks for (and one
without). The real histories come from tests/nemesis/test_nemesis.py; these only prove that a
broken run would not pass unnoticed."""

from __future__ import annotations

from typing import Any

from tests.nemesis import invariants
from tests.nemesis.faults import Fault
from tests.nemesis.history import JobHistory, Sample
from tests.nemesis.workload import JobPlan


def entry(a: int, s: int, kind: str, step: int | None = None, ts: float = 0.0, **metrics: Any) -> dict[str, Any]:
    return {"id": f"{int(ts * 1000)}-{s}", "a": a, "s": s,
            "event": {"kind": kind, "attempt": a, "step": step, "ts": ts, "metrics": metrics}}


def history(job: str, status: str, stream: list[dict[str, Any]], attempts: int = 1, output: str = "",
            finished: float = 100.0) -> JobHistory:
    record = {"id": job, "status": status, "attempts": str(attempts), "output_dir": output,
              "finished_at": str(finished)}
    return JobHistory(job, record, stream, [e["event"] for e in stream if e["s"] > 0])


def good(job: str = "j1") -> JobHistory:
    return history(job, "succeeded", [entry(0, 0, "queued", ts=1), entry(1, 0, "started", ts=2),
                                      entry(1, 1, "log", 1, 3, loss=1.0), entry(1, 2, "log", 2, 4, loss=0.9),
                                      entry(1, 0, "succeeded", ts=5)], output=f"/m/{job}")


def plans(*jobs: str, asked: str | None = None) -> list[JobPlan]:
    return [JobPlan(id=j, at=0, steps=2, step_sleep=0, submitted=True, cancel_asked=asked) for j in jobs]


def test_a_job_that_never_ends_or_ends_twice_breaks_terminal() -> None:
    # Given a job still running, one with two final events, and a good one
    stuck = history("j2", "running", [entry(1, 0, "started", ts=2)])
    twice = history("j3", "failed", [entry(1, 0, "failed", ts=2), entry(1, 0, "failed", ts=3)])
    found = invariants.terminal({"j1": good(), "j2": stuck, "j3": twice}, plans("j1", "j2", "j3"), [],
                                faults_end=50.0, bound=100.0, checked_at=150.0)
    # Then both bad ones, and only they, are reported
    assert sorted(v["subject"] for v in found) == ["j2", "j3"]
    # And a job seen leaving its final state is reported too
    left = [Sample(1.0, {}, {}, {"j1": "succeeded"}), Sample(2.0, {}, {}, {"j1": "running"})]
    assert invariants.terminal({"j1": good()}, plans("j1"), left, 50.0, 100.0, 150.0)


def test_a_worker_idle_while_jobs_wait_breaks_idle_worker_unless_a_fault_excuses_it() -> None:
    # Given a worker that runs nothing for 40 s while a job waits
    samples = [Sample(100.0 + t, {"j9": "q-w0"}, {}, {}) for t in range(41)]
    workers, queues = {"w@h": (0, 0.0, 1000.0)}, {0: {"q", "q-w0"}}
    # Then it is reported, with a bound of 30 s
    assert invariants.idle_workers(samples, workers, [], 30.0, 5.0, {}, queues)
    # But not when the job waits for another worker's queue
    assert not invariants.idle_workers(samples, workers, [], 30.0, 5.0, {}, {0: {"q", "q-w1"}})
    # Nor while a fault on its host (and the settle time after it) excuses it
    cut = Fault(0, "link_cut", 0, 0.0, 40.0, started=95.0, ended=135.0, injected=True)
    assert not invariants.idle_workers(samples, workers, [cut], 30.0, 5.0, {}, queues)
    # And a worker that needed 30 s to stop on SIGTERM is reported as hung
    assert invariants.idle_workers([], workers, [], 30.0, 5.0, {"w@h": 30.5}, queues)


def test_two_models_or_a_model_of_a_failed_job_break_models() -> None:
    # Given two folders whose deepe.json names j1, and a model of a failed job
    failed = history("j2", "failed", [], output="/m/j2")
    found = {"models": [{"path": "/m/j1", "manifest": {"job": "j1", "attempt": 1}},
                        {"path": "/m/j1-copy", "manifest": {"job": "j1", "attempt": 1}},
                        {"path": "/m/j2", "manifest": {"job": "j2", "attempt": 1}}], "hidden": []}
    subjects = [v["subject"] for v in invariants.models({"j1": good(), "j2": failed}, plans("j1", "j2"), found)]
    # Then j1 is reported (twice published, one folder not where its record says), and j2
    assert subjects.count("j1") == 2 and "j2" in subjects
    # And a clean run reports nothing
    one = {"models": [{"path": "/m/j1", "manifest": {"job": "j1", "attempt": 1}}], "hidden": []}
    assert not invariants.models({"j1": good()}, plans("j1"), one)


def test_a_model_of_an_earlier_attempt_passes_only_where_the_last_attempt_said_it_adopted_it() -> None:
    # Given jobs whose model attempt 1 published, and whose last attempt is 2: one where attempt
    # 2 adopted it (its worker lost attempt 1 after the publish), one where it said nothing
    def job(name: str, message: str) -> JobHistory:
        stream = [entry(0, 0, "queued", ts=1), entry(1, 0, "started", ts=2), entry(1, 1, "log", 1, 3, loss=1.0),
                  entry(1, 0, "requeued", ts=4), entry(2, 0, "started", ts=5), entry(2, 0, "saving", ts=6),
                  entry(2, 0, "succeeded", ts=7)]
        stream[5]["event"]["message"] = message
        return history(name, "succeeded", stream, attempts=2, output=f"/m/{name}")

    adopted = job("j1", "attempt 1 of this job (claim w1:7:ab) already published its model at /m/j1; this attempt "
                        "does not train it again")
    silent = job("j2", "saving the model and tokenizer")
    found = {"models": [{"path": f"/m/{j}", "manifest": {"job": j, "attempt": 1, "claim": "w1:7:ab"}}
                        for j in ("j1", "j2")], "hidden": []}
    # Then only the job that did not say so is reported
    assert [v["subject"] for v in invariants.models({"j1": adopted, "j2": silent}, plans("j1", "j2"), found)] == ["j2"]


def test_repeated_missing_or_stale_events_break_events() -> None:
    # Given an attempt with a number twice, one with a gap, and an old attempt's event after a new start
    repeated = good("j2")
    repeated.stream.insert(3, entry(1, 1, "log", 1, 3, loss=1.0))
    gap = good("j3")
    del gap.stream[2]
    stale = good("j4")
    stale.stream[-1:-1] = [entry(2, 0, "started", ts=6), entry(1, 3, "log", 3, 7, loss=0.8)]
    found = invariants.events({"j1": good(), "j2": repeated, "j3": gap, "j4": stale})
    # Then each is reported, and the good job is not
    assert {v["subject"] for v in found} == {"j2", "j3", "j4"}


def test_a_process_left_running_breaks_leftovers() -> None:
    killed = Fault(0, "worker_kill", 0, 0.0, 1.0, injected=True, survivors=["42 python -m deepe_tasks.job.zygote"])
    assert len(invariants.leftovers(["7 python -m deepe_tasks worker"], [killed], [])) == 2
    assert not invariants.leftovers([], [], [".x.staging-j1-a1-abc"])
