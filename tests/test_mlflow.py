"""MLflow tracking against a real `mlflow server` (SQLite): a job's run holds its losses step by
step; a resumed job stays one run with contiguous steps; a server down for part of a job loses
no metric; an evaluation logs into the run of the job it evaluated."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deepe_tasks import EventKind, Job, JobStatus, evaluate, submit
from tests.helpers import SLOW_METHOD, Worker, wait_for, write_method
from tests.mlflow_server import MlflowServer, client, ended_run

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    s = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield s
    s.stop()


def env(server: MlflowServer, **more: str) -> dict[str, str]:
    return {"DEEPE_MLFLOW_URI": server.uri, "DEEPE_MLFLOW_EXPERIMENT": "deepe-tests", "DEEPE_LEASE_TTL": "3",
            "DEEPE_CHECKPOINT_MINUTES": "0.02", **more}


def first_losses(job: Job) -> dict[int, float]:
    """Each step's loss as the stream has it first (a resume runs some steps again)."""
    out: dict[int, float] = {}
    for e in job.events():
        if e.kind is EventKind.LOG and e.step is not None and "loss" in e.metrics:
            out.setdefault(e.step, e.metrics["loss"])
    return out


def history(server: MlflowServer, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client(server).get_metric_history(run_id, key))


def test_a_job_is_one_run_with_its_losses_params_and_tags_and_an_evaluation_logs_into_it(
        workers: list[Worker], tmp_path: Path, server: MlflowServer, sft_params: dict[str, Any],
        colors_data: Path) -> None:
    workers.append(Worker("mlflow-q", tmp_path / "w.log", env=env(server)).start())
    job = submit("sft-demo", {**sft_params, "MAX_STEPS": 6, "EVAL_SPLIT": 0.25, "EVAL_STEPS": 3,
                              "PromptInputColumn": "instruction", "PromptOutputColumn": "output"}, queue="mlflow-q")
    assert job.wait(timeout=180) is JobStatus.SUCCEEDED, job.info()
    run = ended_run(server, job)
    assert run.info.status == "FINISHED"
    assert history(server, run.info.run_id, "loss") == sorted(first_losses(job).items())
    assert [s for s, _ in history(server, run.info.run_id, "eval_loss")] == [3, 6]
    assert run.data.params["LEARNING_RATE"] == str(sft_params["LEARNING_RATE"])
    assert run.data.tags["deepe.job_id"] == job.id and run.data.tags["deepe.status"] == "succeeded"
    assert run.data.tags["deepe.model"] == job.info()["output_dir"]
    assert job.info()["mlflow_url"].endswith(f"/runs/{run.info.run_id}")
    # And an evaluation of the job logs its metrics into the job's run
    evaluated = evaluate(job.id, str(colors_data), max_samples=4, queue="mlflow-q")
    assert evaluated.wait(timeout=180) is JobStatus.SUCCEEDED
    wait_for(lambda: history(server, run.info.run_id, "eval/colors/loss"), timeout=60)
    assert history(server, run.info.run_id, "eval/colors/loss")[0][1] == pytest.approx(evaluated.info()["metrics"]["loss"])


def test_steps_a_resume_trains_again_are_sent_once_even_when_both_attempts_come_in_one_batch(
        server: MlflowServer, r: Any, sft_params: dict[str, Any]) -> None:
    from deepe_tasks.core import keys
    from deepe_tasks.core.records import Event
    from deepe_tasks.core.settings import get_settings
    from deepe_tasks.worker.tracking import Tracker

    # Given a job whose stream holds attempt 1's steps 1-5 and attempt 2's, resumed from the
    # checkpoint of step 3, steps 4-7 (as a tracker finds it after its server was down meanwhile)
    job = submit("sft-demo", sft_params, queue="mlflow-nobody")
    for attempt, steps in ((1, range(1, 6)), (2, range(4, 8))):
        for step in steps:
            event = Event(kind=EventKind.LOG, job=job.id, attempt=attempt, step=step, max_steps=7,
                          metrics={"loss": 10.0 * attempt + step})
            r.xadd(keys.events(job.id), {"data": event.to_json()})
    settings = get_settings().model_copy(update={"mlflow_uri": server.uri, "mlflow_experiment": "deepe-tests"})
    # When one tracker round sends it all in one batch
    tracker = Tracker(r, settings, "test-holder")
    tracker.feed(job.id)
    # Then each step is in the run once, with the value its first attempt logged
    run_id = job.info()["mlflow_run"]
    assert history(server, run_id, "loss") == [(s, 10.0 + s) for s in range(1, 6)] + [(6, 26.0), (7, 27.0)]
    # And the next round, with nothing new, sends nothing again
    assert tracker.feed(job.id) == 0
    job.cancel()


def test_a_resumed_job_with_the_server_down_meanwhile_is_one_run_with_every_step_once(
        workers: list[Worker], tmp_path: Path, server: MlflowServer, store: Path,
        sft_params: dict[str, Any]) -> None:
    slow = write_method(store, "mlflow_slow", SLOW_METHOD)
    first = Worker("mlflow-kill", tmp_path / "w1.log", env=env(server)).start()
    workers.append(first)
    job = submit(slow, {**sft_params, "MAX_STEPS": 40, "step_sleep": 0.4, "PromptInputColumn": "instruction",
                        "PromptOutputColumn": "output"}, queue="mlflow-kill")
    wait_for(lambda: len(first_losses(job)) >= 3 and job.info().get("mlflow_run"), timeout=180)
    # When the tracking server goes away, and then the worker is SIGKILLed after a checkpoint
    server.stop()
    wait_for(lambda: any(e.kind is EventKind.CHECKPOINT for e in job.events()) and len(first_losses(job)) >= 6,
             timeout=120)
    first.process.signal(signal.SIGKILL, group=True)
    assert not job.status().is_final, "the job ended before its worker was killed"
    workers.append(Worker("mlflow-kill", tmp_path / "w2.log", env=env(server)).start())
    wait_for(lambda: any(e.kind is EventKind.RESUMED for e in job.events()), timeout=120)
    # and comes back while the job trains on another worker
    server.start()
    assert job.wait(timeout=240) is JobStatus.SUCCEEDED, job.info()
    run = ended_run(server, job)
    # Then the job is one run, every step's loss once, as the stream had it first
    assert job.info()["attempts"] == 2
    losses = history(server, run.info.run_id, "loss")
    assert [s for s, _ in losses] == list(range(1, 41))
    assert losses == sorted(first_losses(job).items())
    runs = client(server).search_runs([run.info.experiment_id], filter_string=f"tags.`deepe.job_id` = '{job.id}'")
    assert len(runs) == 1


def reporting_method(store: Path, name: str) -> str:
    """The shipped SFT-Demo method, with its SFTConfig asking for transformers' MLflowCallback."""
    from deepe_tasks.contract.methods import BUILTIN

    source = (BUILTIN / "sft-demo.py").read_text()
    assert source.count('report_to="none"') == 1
    return write_method(store, name, source.replace('report_to="none"', 'report_to="mlflow"'))


def test_a_method_reporting_to_mlflow_itself_gets_a_run_of_its_own_tagged_with_the_job(
        workers: list[Worker], tmp_path: Path, server: MlflowServer, store: Path,
        sft_params: dict[str, Any]) -> None:
    # Given the SFT demo with report_to="mlflow", and workers with DEEPE_MLFLOW_URI only (no MLFLOW_* set)
    method = reporting_method(store, "mlflow_reporting")
    workers.append(Worker("mlflow-own", tmp_path / "w.log", env=env(server)).start())
    job = submit(method, {**sft_params, "MAX_STEPS": 5}, queue="mlflow-own")
    assert job.wait(timeout=180) is JobStatus.SUCCEEDED, job.info()["error"]
    # Then deepe's run holds every step once, from the events, as for any method
    run = ended_run(server, job)
    assert run.data.tags["deepe.source"] == "platform"
    assert history(server, run.info.run_id, "loss") == sorted(first_losses(job).items())
    assert [s for s, _ in history(server, run.info.run_id, "loss")] == [1, 2, 3, 4, 5]
    # and the method's own run is on the same server, in the same experiment, found by the job id
    runs = client(server).search_runs([run.info.experiment_id], filter_string=f"tags.`deepe.job_id` = '{job.id}'")
    assert sorted(r.data.tags["deepe.source"] for r in runs) == ["method", "platform"]
    own = next(r for r in runs if r.data.tags["deepe.source"] == "method")
    assert own.info.run_id != run.info.run_id and own.info.status == "FINISHED"
    assert own.data.tags["deepe.attempt"] == "1"
    assert {s for s, _ in history(server, own.info.run_id, "loss")} == {1, 2, 3, 4, 5}
    assert float(own.data.params["learning_rate"]) == sft_params["LEARNING_RATE"]


def test_a_method_reporting_to_mlflow_with_the_server_down_still_trains_and_succeeds(
        workers: list[Worker], tmp_path: Path, store: Path, sft_params: dict[str, Any]) -> None:
    from deepe_tasks.core.settings import get_settings
    from deepe_tasks.core.storage import job_dir
    from deepe_tasks.fixtures.embedded import free_port

    # Given the same method, and DEEPE_MLFLOW_URI naming a server that does not answer
    method = reporting_method(store, "mlflow_reporting_down")
    down = {"DEEPE_MLFLOW_URI": f"http://127.0.0.1:{free_port()}", "DEEPE_MLFLOW_EXPERIMENT": "deepe-tests"}
    workers.append(Worker("mlflow-down", tmp_path / "w.log", env=down).start())
    job = submit(method, {**sft_params, "MAX_STEPS": 3}, queue="mlflow-down")
    # Then the job trains and succeeds all the same; its log says why the method's run is off
    assert job.wait(timeout=180) is JobStatus.SUCCEEDED, job.info()["error"]
    assert max(first_losses(job)) == 3
    log = (job_dir(get_settings().storage_root, job.id) / "output.log").read_text()
    assert "the method's own MLflow run (report_to=\"mlflow\") failed in on_train_begin" in log, log[-3000:]
